"""GPNN on an image set (SIGD16) with the single-image papers' measures, the published GPNN
outputs scored beside fastgen's samples.

    python benchmarks/bench_single_image.py --gpdm PATH --max-side 128 --samples 10 --out runs/sigd16

--gpdm: the public GPDM repository (github: ariel415el/GPDM, Apache-2.0), a checkout or
a bare git directory; it ships the 16 SIGD16 images (data/images/SIGD16) and the published
GPNN outputs (data/downloaded_results/SIGD16_GPNN, one per image, taken from the GPNN
paper's user-study pages). The images are read from there, never copied into this
repository. Or --images DIR [--published DIR] for any folder of images.

Per image, at --max-side (the papers' 250, or 128): `--samples` fastgen GPNN samples
(defaults, seeds 0..N-1): the papers' pixel diversity over them, and per sample the patch
fidelity (mean squared difference of each 7x7 patch to its nearest source patch, exact),
the patch SWD to the source (7x7, 64 projections) and the layout similarity to the source
(thumbnail correlation: ~1 a copy); seconds per sample and the peak memory above the
start. The published GPNN output (one image, resized to the same size) gets the same
per-sample measures (its diversity needs several samples: not computable from one).
SIFID is not computed (its Inception weights cannot be downloaded here). A contact sheet
per image (source, published GPNN, three fastgen samples) goes to --out.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SET_IMAGES = "data/images/SIGD16"
SET_PUBLISHED = "data/downloaded_results/SIGD16_GPNN"


def _files_from_git(git_dir, folder, dest):
    """Write the files of `folder` at HEAD of a (bare) git directory into dest; paths."""
    names = subprocess.run(["git", f"--git-dir={git_dir}", "ls-tree", "--name-only", f"HEAD:{folder}"],
                           capture_output=True, text=True, check=True).stdout.split()
    os.makedirs(dest, exist_ok=True)
    out = []
    for n in names:
        blob = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{folder}/{n}"], capture_output=True,
                              check=True).stdout
        path = os.path.join(dest, n)
        with open(path, "wb") as f:
            f.write(blob)
        out.append(path)
    return out


def image_pairs(args):
    """[(name, source path, published path or None)] sorted by the images' numbers."""
    if args.gpdm:
        if os.path.isdir(os.path.join(args.gpdm, SET_IMAGES)):
            src = [os.path.join(args.gpdm, SET_IMAGES, n) for n in os.listdir(os.path.join(args.gpdm, SET_IMAGES))]
            pub_dir = os.path.join(args.gpdm, SET_PUBLISHED)
        else:   # a bare repository: the files go to --out/inputs (outside this repository)
            cache = os.path.join(args.out, "inputs")
            src = _files_from_git(args.gpdm, SET_IMAGES, os.path.join(cache, "SIGD16"))
            pub_dir = os.path.join(cache, "SIGD16_GPNN")
            _files_from_git(args.gpdm, SET_PUBLISHED, pub_dir)
    else:
        src = [os.path.join(args.images, n) for n in os.listdir(args.images)]
        pub_dir = args.published
    pairs = []
    for p in src:
        stem = os.path.splitext(os.path.basename(p))[0]
        pub = None
        if pub_dir:
            for ext in (".png", ".jpg"):
                if os.path.isfile(os.path.join(pub_dir, stem + ext)):
                    pub = os.path.join(pub_dir, stem + ext)
        pairs.append((stem, p, pub))
    return sorted(pairs, key=lambda t: (len(t[0]), t[0]))


def per_sample(x, src):
    from fastgen.metrics import layout_similarity, patch_fidelity, patch_swd
    return {"fidelity": patch_fidelity(x, src), "swd": patch_swd(x, src), "layout": layout_similarity(x, src)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--gpdm", help="the GPDM repository (checkout or bare git dir)")
    src.add_argument("--images", help="a folder of source images")
    ap.add_argument("--published", default=None, help="with --images: a folder of published outputs (same names)")
    ap.add_argument("--max-side", type=int, default=128)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--limit", type=int, default=None, help="only the first LIMIT images")
    ap.add_argument("--diversity", type=float, default=1.0, help="GPNN(diversity=...): 1 the default, 0 closest "
                                                                 "to the source's layout")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.samples < 2:
        ap.error("--samples must be >= 2 (diversity compares samples)")
    from fastgen.benchmarking import machine_line, peak_kb, release_free_heap, reset_peak_kb
    from fastgen.images import load_image, save_grid
    from fastgen.metrics import pixel_diversity
    from fastgen.models import GPNN
    os.makedirs(a.out, exist_ok=True)
    pairs = image_pairs(a)[:a.limit]
    print(machine_line())
    print(f"{len(pairs)} images, max side {a.max_side}, {a.samples} fastgen samples each (GPNN defaults, "
          f"diversity={a.diversity})\n")
    print("| image | size | diversity | fidelity fastgen | fidelity published | SWD fastgen | SWD published | "
          "layout fastgen | layout published | s / sample | peak MB |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    rows = []
    gpnn = GPNN(diversity=a.diversity)
    for name, sp, pp in pairs:
        source = load_image(sp, max_side=a.max_side)
        release_free_heap()
        base, method = reset_peak_kb()
        t = time.perf_counter()
        samples = gpnn.sample(source, a.samples, seed=0, progress=False)
        seconds = (time.perf_counter() - t) / a.samples
        peak = (peak_kb(method) - base) / 1024
        ours = [per_sample(s, source) for s in samples]
        row = {"image": name, "size": list(source.shape[1:]), "diversity": pixel_diversity(source, samples),
               "seconds_per_sample": seconds, "peak_mb": peak,
               **{f"{k}_fastgen": statistics.mean(o[k] for o in ours) for k in ("fidelity", "swd", "layout")}}
        sheet = [source]
        if pp:
            pub = load_image(pp)
            pub = F.interpolate(pub[None], size=source.shape[1:], mode="bicubic", antialias=True,
                                align_corners=False)[0].clamp(0, 1)
            row.update({f"{k}_published": v for k, v in per_sample(pub, source).items()})
            sheet.append(pub)
        sheet += list(samples[:3])
        save_grid(torch.stack(sheet), os.path.join(a.out, f"{name}.png"), nrow=len(sheet))
        rows.append(row)

        def f(k, fmt=".4f"):
            return format(row[k], fmt) if k in row else "-"
        print(f"| {name} | {row['size'][0]}x{row['size'][1]} | {row['diversity']:.3f} | {f('fidelity_fastgen')} | "
              f"{f('fidelity_published')} | {f('swd_fastgen')} | {f('swd_published')} | {f('layout_fastgen', '.2f')} | "
              f"{f('layout_published', '.2f')} | {seconds:.2f} | {peak:.0f} |", flush=True)
    keys = ["diversity", "fidelity_fastgen", "fidelity_published", "swd_fastgen", "swd_published", "layout_fastgen",
            "layout_published", "seconds_per_sample"]
    means = {k: statistics.mean(r[k] for r in rows if k in r) for k in keys if any(k in r for r in rows)}
    print("| mean | | " + " | ".join(f"{means[k]:.4f}" if k in means else "-" for k in keys) + " | |")
    with open(os.path.join(a.out, "results.json"), "w") as fh:
        json.dump({"max_side": a.max_side, "samples": a.samples, "diversity": a.diversity, "rows": rows,
                   "means": means}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
