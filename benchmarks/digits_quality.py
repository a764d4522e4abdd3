"""The README's quality table: every generative family trained on sklearn digits at the
settings the table names, then scored by `fastgen eval --table` (FD on the package's
digit features, precision / recall / density / coverage, class coverage, the share of
samples the digits classifier labels with p > 0.8, and training minutes).

    python benchmarks/digits_quality.py --out runs/quality      (about 6 minutes on 2 cores)

Each stage is one `fastgen` command run as its own process, as a user would type it;
the folders are the ones `fastgen eval --table` looks for. Writes OUT/eval.md,
OUT/eval.json, OUT/stages.json (the seconds of every command) and OUT/pictures.png (a
row of samples per model).
"""
import argparse
import json
import os
import subprocess
import sys
import time


def stages(out):
    o = lambda *p: os.path.join(out, *p)  # noqa: E731
    ck = lambda name: o(name, "checkpoint.pt")  # noqa: E731
    return [
        ("ae", ["train", "ae", "--data", "digits", "--epochs", "20", "--out", o("ae")]),
        ("vae", ["train", "vae", "--data", "digits", "--epochs", "150", "--eval-every", "50", "--out", o("vae")]),
        ("vqvae", ["train", "vqvae", "--data", "digits", "--epochs", "20", "--eval-every", "10", "--out", o("vqvae")]),
        ("pixelcnn", ["train", "pixelcnn", "--vqvae", ck("vqvae"), "--epochs", "20", "--class-conditional",
                      "--attention", "every", "--out", o("pixelcnn")]),
        ("imle", ["train", "imle", "--data", "digits", "--epochs", "150", "--eval-every", "50", "--out", o("imle")]),
        ("vqvae2", ["train", "vqvae2", "--data", "digits", "--size", "32", "--hidden", "64", "--num-codes", "64",
                    "--epochs", "10", "--out", o("vqvae2")]),
        ("prior-top", ["train", "prior", "--vqvae2", ck("vqvae2"), "--level", "top", "--epochs", "20",
                       "--class-conditional", "--attention", "every", "--out", o("prior-top")]),
        ("prior-bottom", ["train", "prior", "--vqvae2", ck("vqvae2"), "--level", "bottom", "--epochs", "20",
                          "--cond-blocks", "2", "--out", o("prior-bottom")]),
        ("transformer", ["train", "transformer", "--vqvae", ck("vqvae"), "--epochs", "10", "--out", o("transformer")]),
        ("eval", ["eval", "--table", out]),
    ]


def pictures(out):
    """One row of 10 samples per model (what the table scored, seed 0)."""
    import torch

    from fastgen.commands.eval import sample_checkpoint
    from fastgen.images import save_grid
    from fastgen.training import load_checkpoint
    rows = []
    for folder, prior in (("vae", None), ("vqvae", "pixelcnn"), ("imle", None),
                          ("vqvae2", ("prior-top", "prior-bottom")), ("transformer", None)):
        path = os.path.join(out, folder, "checkpoint.pt")
        if not os.path.isfile(path):
            continue
        pri = None if prior is None else tuple(os.path.join(out, p, "checkpoint.pt") for p in
                                               (prior if isinstance(prior, tuple) else (prior,)))
        pri = pri[0] if pri is not None and len(pri) == 1 else pri
        x = sample_checkpoint(load_checkpoint(path), path, 10, 0, "cpu", pri)
        if x.shape[-1] != 8:
            x = torch.nn.functional.interpolate(x, size=(8, 8), mode="area")
        rows.append(x)
    return save_grid(torch.cat(rows), os.path.join(out, "pictures.png"), nrow=10)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/quality", help="folder for the runs (must not exist or be empty)")
    p.add_argument("--only", default=None, help="comma-separated stage names (the others are skipped)")
    args = p.parse_args(argv)
    if os.path.isdir(args.out) and os.listdir(args.out) and args.only is None:
        p.error(f"--out {args.out!r} is not empty; choose another folder")
    os.makedirs(args.out, exist_ok=True)
    chosen = None if args.only is None else set(args.only.split(","))
    timings = {}
    for name, cli in stages(args.out):
        if chosen is not None and name not in chosen:
            continue
        print(f"[quality] {name}: fastgen {' '.join(cli)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "fastgen.cli", *cli, *(["--quiet"] if cli[0] == "train" else [])])
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[quality] {name}: {timings[name]} s", flush=True)
        if rc != 0:
            print(f"[quality] {name} failed (exit {rc})", file=sys.stderr)
            return rc
    with open(os.path.join(args.out, "stages.json"), "w") as f:
        json.dump(timings, f, indent=1)
    print(f"wrote {pictures(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
