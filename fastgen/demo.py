"""`make demo`'s main job: every model family on built-in data (sklearn's china.jpg and
digits, no download), one `fastgen` command per stage, each timed.

    python -m fastgen.demo --out demo-out

Each stage runs as its own process, exactly as a user would type it, so a stage cannot
lean on state another left behind. The seconds per stage are printed as each ends and
again as a table at the end, and kept in OUT/timings.json.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time


MARKER = ".fastgen-demo"  # a folder holding it was made by the demo and may be emptied


def stages(out):
    """(name, fastgen arguments) in order; later stages read earlier stages' checkpoints."""
    o = lambda name: os.path.join(out, name)  # noqa: E731
    return [
        ("doctor", ["doctor"]),
        ("gpnn samples", ["gpnn", "sample", "-n", "4", "--max-side", "96", "--out", o("gpnn")]),
        ("train ae", ["train", "ae", "--data", "digits", "--epochs", "20", "--out", o("ae")]),
        ("train vae", ["train", "vae", "--data", "digits", "--epochs", "150", "--eval-every", "50", "--out", o("vae")]),
        ("train vqvae", ["train", "vqvae", "--data", "digits", "--epochs", "20", "--eval-every", "10",
                         "--out", o("vqvae")]),
        # a class-conditional PixelSNAIL-style prior: every class drawn in turn
        ("train pixelcnn", ["train", "pixelcnn", "--vqvae", o("vqvae/checkpoint.pt"), "--epochs", "20",
                            "--class-conditional", "--attention", "every", "--out", o("pixelcnn")]),
        ("sample vqvae", ["sample", "vqvae", "--checkpoint", o("vqvae/checkpoint.pt"),
                          "--prior", o("pixelcnn/checkpoint.pt"), "--out", o("vqvae-samples"), "-n", "64"]),
        ("train imle", ["train", "imle", "--data", "digits", "--epochs", "60", "--eval-every", "20",
                        "--out", o("imle")]),
        ("train imle (conditional)", ["train", "imle", "--data", "digits", "--conditional", "top-half",
                                      "--epochs", "60", "--eval-every", "20", "--out", o("imle-conditional")]),
        ("sample imle completions", ["sample", "imle", "--checkpoint", o("imle-conditional/checkpoint.pt"),
                                     "--out", o("imle-completions"), "-n", "12"]),
        ("eval table", ["eval", "--table", out]),
        ("bench --quick", ["bench", "--quick", "--repeats", "3"]),
    ]


def format_table(timings):
    width = max(len(name) for name, _ in timings)
    lines = [f"{'stage':<{width}}  seconds", f"{'-' * width}  -------"]
    lines += [f"{name:<{width}}  {sec:7.1f}" for name, sec in timings]
    lines.append(f"{'total':<{width}}  {sum(s for _, s in timings):7.1f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastgen.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-out", help="folder for every stage's output (emptied first)")
    p.add_argument("--only", default=None,
                   help="comma-separated stage names to run (the others are skipped; for trying one stage)")
    args = p.parse_args(argv)
    out = args.out
    chosen = None if args.only is None else {s.strip() for s in args.only.split(",")}
    known = [name for name, _ in stages(out)]
    if chosen is not None and not chosen <= set(known):
        p.error(f"--only: unknown stage(s) {sorted(chosen - set(known))}; the stages: {', '.join(known)}")
    marker = os.path.join(out, MARKER)
    if os.path.exists(out):
        # emptied only when an earlier demo made it: never a folder of the user's own
        if not os.path.isdir(out):
            p.error(f"--out {out!r} exists and is not a folder")
        if os.listdir(out) and not os.path.exists(marker):
            p.error(f"--out {out!r} is not empty and was not made by the demo; choose another folder")
        shutil.rmtree(out)
    os.makedirs(out)
    open(marker, "w").close()
    timings = []
    for name, cli_args in stages(out):
        if chosen is not None and name not in chosen:
            continue
        print(f"[demo] {name}: fastgen {' '.join(cli_args)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "fastgen.cli", *cli_args])
        sec = time.perf_counter() - t0
        timings.append((name, sec))
        print(f"[demo] {name}: {sec:.1f} s", flush=True)
        if rc != 0:
            print(f"[demo] stage {name!r} failed (exit {rc}); stopping", file=sys.stderr)
            return rc
    print("\n" + format_table(timings))
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump({"stages": [{"name": n, "seconds": round(s, 2)} for n, s in timings],
                   "total_seconds": round(sum(s for _, s in timings), 2)}, f, indent=1)
    print(f"demo images: {out}/*/*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
