"""One exact IMLE search round at scale: 10,000 data points, 1,000,000 generated samples.

    python benchmarks/imle_search_scale.py                     # fastgen, then faiss beside it
    python benchmarks/imle_search_scale.py --points 2000 --samples-per-point 50   # smaller

Data: sklearn's digits at 16 x 16 (D = 256), each of the 1,437 training digits shifted by
up to one pixel and given 2 % noise until there are --points of them. Model: IMLE with
its MLP generator (z_dim 64), samples_per_point = samples / points, chunks of 4,096
samples generated and searched as they come (StreamingKNN: the samples are never held).

Printed: seconds for the round (generation and search as the round reports them), the
peak resident memory above the process's baseline (VmHWM), and what holding all the
samples in float32 would take. faiss (when installed): the same samples generated
into one array, IndexFlatL2 over them, searched by the data -- its time (generation
excluded) and peak, and whether it picks the same sample for each point.
"""
import argparse
import time

import torch

from fastgen.benchmarking import machine_line, peak_kb, release_free_heap, reset_peak_kb
from fastgen.data import load_digits
from fastgen.models.imle import IMLE


def make_data(points, seed=0):
    base = load_digits(size=16).train
    g = torch.Generator().manual_seed(seed)
    reps = -(-points // base.shape[0])
    x = base.repeat(reps, 1, 1, 1)[:points]
    shifts = torch.randint(-1, 2, (points, 2), generator=g)
    out = torch.empty_like(x)
    for (dy, dx) in {tuple(s) for s in shifts.tolist()}:
        rows = ((shifts[:, 0] == dy) & (shifts[:, 1] == dx)).nonzero().flatten()
        out[rows] = torch.roll(x[rows], shifts=(dy, dx), dims=(2, 3))
    return (out + 0.02 * torch.randn(out.shape, generator=g)).clamp(0, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=10_000)
    ap.add_argument("--samples-per-point", type=int, default=100)
    ap.add_argument("--no-faiss", action="store_true")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    data = make_data(a.points)
    model = IMLE((1, 16, 16), arch="mlp", samples_per_point=a.samples_per_point, chunk=4096)
    total = a.points * a.samples_per_point
    print(machine_line())
    print(f"{a.points} points x {a.samples_per_point} samples = {total:,} samples, D = 256")

    release_free_heap()
    base_kb, method = reset_peak_kb()
    t = time.perf_counter()
    info = model.search(data, generator=torch.Generator().manual_seed(1))
    seconds = time.perf_counter() - t
    peak_mb = (peak_kb(method) - base_kb) / 1024
    held_mb = total * 256 * 4 / 2 ** 20
    print(f"fastgen round: {seconds:.1f} s (generate {info['seconds_generate']:.1f} s, "
          f"search {info['seconds_search']:.1f} s), peak +{peak_mb:.0f} MB ({method}); "
          f"holding the samples: {held_mb:.0f} MB; peak / held = {peak_mb / held_mb:.3f}; "
          f"mean nearest distance {info['mean_nearest_dist']:.4f}")
    if a.no_faiss:
        return 0
    try:
        import faiss
    except ImportError:
        print("faiss not installed")
        return 0
    # the same samples (the round's seed and chunking), held in one array
    model.eval()
    release_free_heap()
    base_kb, method = reset_peak_kb()
    with torch.no_grad():
        round_seed = model._round_seed(torch.Generator().manual_seed(1))
        samples = torch.empty(total, 256)
        for c in range(-(-total // model.chunk)):
            s0 = c * model.chunk
            z = model._chunk_codes(round_seed, c, min(model.chunk, total - s0), "cpu")
            samples[s0:s0 + z.shape[0]] = model.features(model.generate(z))
    t = time.perf_counter()
    index = faiss.IndexFlatL2(256)
    index.add(samples.numpy())
    d, i = index.search(model.features(data).numpy(), 1)
    tf = time.perf_counter() - t
    peak_f = (peak_kb(method) - base_kb) / 1024
    chosen = model._codes_at(round_seed, torch.from_numpy(i[:, 0]).long(), total, "cpu")
    same = float((chosen == model.chosen_z).all(1).float().mean())
    print(f"faiss IndexFlatL2: add + search {tf:.1f} s (generation excluded), peak +{peak_f:.0f} MB "
          f"(the samples held); same sample chosen for {same:.4f} of points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
