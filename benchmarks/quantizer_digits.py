"""VQ-VAE on sklearn digits with each quantizer at one code count: reconstruction error,
code usage and time, and one picture of the reconstructions side by side.

    python benchmarks/quantizer_digits.py                     # 64 codes, 10 epochs each
    python benchmarks/quantizer_digits.py --epochs 20 --out runs/quantizers

The quantizers at 64 codes: vq (a learned 64 x 16 codebook, EMA, k-means init, dead-code
reset), fsq (levels 4,4,4: 3 channels), lfq (6 channels, 2^6 codes, entropy penalty 0.1);
and 64 = 8 x 8 as two codes of 8 per position: residual vq (2 stages), grouped vq (2
heads of 8 channels sharing an 8-code codebook), residual fsq (levels 4,2, 2 stages).
Each is `fastgen train vqvae` with the same data, seed, network and epochs; the table is
the last epoch's held-out rows (test MSE per pixel, perplexity of the codes the test set
uses, codes used), the seconds the run took, and the PNG stacks, per quantizer, 8 test
digits above their reconstructions.
"""
import argparse
import json
import os
import re
import sys
import time

import torch

QUANTIZERS = {"vq": ["--quantizer", "vq", "--num-codes", "64", "--code-dim", "16"],
              "fsq": ["--quantizer", "fsq", "--levels", "4,4,4"],
              "lfq": ["--quantizer", "lfq", "--num-codes", "64"],
              # 64 codes as 8 x 8: two codes of 8 per position
              "rvq 2x8": ["--quantizer", "vq", "--num-codes", "8", "--code-dim", "16", "--stages", "2"],
              "grouped vq 2x8": ["--quantizer", "vq", "--num-codes", "8", "--code-dim", "16", "--groups", "2"],
              "rfsq 2x(4,2)": ["--quantizer", "fsq", "--levels", "4,2", "--stages", "2"]}


def _folder(name):
    """'rfsq 2x(4,2)' -> 'rfsq-2x-4-2': a run folder name without spaces or brackets."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", default="quantizer-digits")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from fastgen.benchmarking import machine_line
    from fastgen.cli import main as cli
    from fastgen.commands.train_vqvae import evaluate
    from fastgen.data import load_digits
    from fastgen.images import save_grid
    from fastgen.models import build_model
    from fastgen.training import load_checkpoint
    taken = [n for n in QUANTIZERS if os.path.exists(os.path.join(a.out, _folder(n)))]
    if taken:
        ap.error(f"--out {a.out!r} already holds runs ({', '.join(taken)}): choose a new folder")
    print(machine_line())
    print(f"digits, 64 codes, {a.epochs} epochs, seed {a.seed}\n")
    print("| quantizer | test MSE / pixel | perplexity | codes used | seconds |")
    print("|---|--:|--:|--:|--:|")
    ds = load_digits()
    x = ds.test[:8]
    rows = [x]
    for name, flags in QUANTIZERS.items():
        out = os.path.join(a.out, _folder(name))
        t = time.perf_counter()
        rc = cli(["train", "vqvae", "--data", "digits", "--epochs", str(a.epochs), "--seed", str(a.seed),
                  "--out", out, "--quiet", *flags])
        seconds = time.perf_counter() - t
        if rc != 0:
            print(f"| {name} | failed (exit {rc}) | | | |")
            continue
        ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
        model = build_model("vqvae", ck["config"])
        model.load_state_dict(ck["model"])
        m = evaluate(model, ds.test, "cpu")
        print(f"| {name} | {m['test_mse']:.4f} | {m['test_perplexity']:.1f} | {m['codes_used']} of {m['num_codes']} "
              f"| {seconds:.1f} |", flush=True)
        with torch.no_grad():
            rows.append(model.reconstruct(x))
    path = save_grid(torch.cat(rows), os.path.join(a.out, "reconstructions.png"), nrow=8)
    print(f"\nrows: 8 test digits, then the reconstructions of {', '.join(QUANTIZERS)}: {path}")
    with open(os.path.join(a.out, "table.json"), "w") as f:
        json.dump({"epochs": a.epochs, "seed": a.seed}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
