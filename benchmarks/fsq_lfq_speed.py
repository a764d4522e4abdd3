"""FSQ and LFQ beside vector-quantize-pytorch's: one training forward + backward, time
and peak memory, and whether the codes agree.

    python benchmarks/fsq_lfq_speed.py                 # N = 65,536 tokens
    python benchmarks/fsq_lfq_speed.py --n 16384

Cells (each in a fresh process): FSQ levels 8,5,5,5 (2^10 codes) and 8,8,8,6,5 (2^14);
LFQ with its entropy penalty at 10 bits and 14 bits. The peer's LFQ computes an
N x 2^d probability matrix (and its softmax's gradient): where three such float32
matrices would pass --peer-limit-gb it is not run and its need is printed. Same inputs
(seeded), same defaults as the peer; "codes" says whether the indices were identical.
"""
import argparse
import json
import sys
import time

import torch

from fastgen.benchmarking import RESULT_TAG, run_child

CELLS = [("fsq", "8,5,5,5"), ("fsq", "8,8,8,6,5"), ("lfq", "10"), ("lfq", "14")]


def _one(provider, kind, spec, n):
    from fastgen.benchmarking import peak_kb, release_free_heap, reset_peak_kb
    torch.manual_seed(0)
    if kind == "fsq":
        levels = [int(v) for v in spec.split(",")]
        d = len(levels)
        if provider == "fastgen":
            from fastgen.nn import FSQ
            layer = FSQ(levels)
            run = lambda x: (lambda o: (o.quantized, o.indices, None))(layer(x))   # noqa: E731
        else:
            from vector_quantize_pytorch import FSQ as PeerFSQ
            layer = PeerFSQ(levels=levels)
            run = lambda x: (*layer(x[None]), None)   # noqa: E731 (the peer wants (B, N, D))
    else:
        d = int(spec)
        if provider == "fastgen":
            from fastgen.nn import LFQ
            layer = LFQ(d)
            run = lambda x: (lambda o: (o.quantized, o.indices, o.losses["entropy"]))(layer(x))   # noqa: E731
        else:
            from vector_quantize_pytorch import LFQ as PeerLFQ
            layer = PeerLFQ(dim=d, codebook_size=2 ** d)
            run = lambda x: layer(x[None])   # noqa: E731 (the peer wants (B, N, D))
    layer.train()

    def step(x):
        q, idx, loss = run(x)
        total = q.sum() + (loss.sum() if loss is not None else 0)
        total.backward()
        return idx

    step(torch.randn(1024, d, requires_grad=True))
    x = (torch.randn(n, d, generator=torch.Generator().manual_seed(1)) * 0.5).requires_grad_()
    release_free_heap()
    base, method = reset_peak_kb()
    t = time.perf_counter()
    idx = step(x)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_mb": (peak_kb(method) - base) / 1024,
            "idx_sum": int(idx.long().sum()), "idx_first": idx.reshape(-1)[:64].long().tolist()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--peer-limit-gb", type=float, default=16.0)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        provider, kind, spec = a.one.split(":")
        print(RESULT_TAG + json.dumps(_one(provider, kind, spec, a.n)))
        return 0
    from fastgen.benchmarking import machine_line
    print(machine_line())
    print(f"N = {a.n} tokens; one training forward + backward; fresh process per cell\n")
    print("| quantizer | codes | fastgen s | fastgen peak MB | peer s | peer peak MB | peer / fastgen | same codes |")
    print("|---|--:|--:|--:|--:|--:|--:|---|")
    for kind, spec in CELLS:
        codes = 2 ** int(spec) if kind == "lfq" else int(torch.tensor([int(v) for v in spec.split(",")]).prod())
        cells = {}
        for provider in ("fastgen", "peer"):
            need_gb = 3 * 4 * a.n * codes / 2 ** 30
            if provider == "peer" and kind == "lfq" and need_gb > a.peer_limit_gb:
                cells[provider] = f"not run (needs ~{need_gb:.0f} GB)"
                continue
            cmd = [sys.executable, __file__, "--one", f"{provider}:{kind}:{spec}", "--n", str(a.n)]
            cells[provider] = run_child(cmd, a.timeout)   # a dict, or why there is none
        f, p = cells["fastgen"], cells["peer"]
        fs = f"{f['seconds']:.3f} | {f['peak_mb']:.0f}" if isinstance(f, dict) else f"{f} | -"
        ps = f"{p['seconds']:.3f} | {p['peak_mb']:.0f}" if isinstance(p, dict) else f"{p} | -"
        both = isinstance(f, dict) and isinstance(p, dict)
        ratio = f"{p['seconds'] / f['seconds']:.2f}" if both else "-"
        same = ("yes" if f["idx_sum"] == p["idx_sum"] and f["idx_first"] == p["idx_first"] else "no") if both else "-"
        print(f"| {kind} {spec} | {codes} | {fs} | {ps} | {ratio} | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
