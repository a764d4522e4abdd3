"""The prepared GPU check (issue 17), run by benchmarks/gpu_check.sh on a machine with a
CUDA GPU: correctness of every op on CUDA tensors against the float64 reference, timings
against torch on the GPU (and faiss-gpu when installed), one full-size GPNN sample --
everything into one Markdown report. Not run yet: no GPU has been lent to this project.

    python benchmarks/gpu_check.py OUT_DIR
"""
import json
import os
import sys
import time

import torch


# GPU_CHECK_DEVICE=cpu runs the same code on the CPU backends: a smoke test of the script
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps=5):
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def correctness(lines):
    from fastgen.ops import ball_count, fold_patches, knn, nearest_code, patch_nn, reference, reparameterize
    dev = DEVICE
    g = torch.Generator().manual_seed(0)
    checks = []
    sizes = ((37, 53, 3, 1), (300, 1000, 64, 10), (1000, 5000, 147, 16), (4096, 4096, 256, 64))
    for n, m, d, k in (sizes if DEVICE == "cuda" else sizes[:2]):
        q, x = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
        dist, idx = knn(q.to(dev), x.to(dev), k)
        ref_d, ref_i = reference.knn_exact(q, x, k)
        checks.append((f"knn {n}x{m}x{d} k={k}", float((dist.cpu().double() - ref_d).abs().max()), 1e-3))
        checks.append((f"knn fp32 {n}x{m}x{d} k={k} (indices differing from float64)", float((idx.cpu() != ref_i).sum()), 0))
        _, idx16 = knn(q.to(dev), x.to(dev), k, precision="bf16")
        checks.append((f"knn bf16 {n}x{m}x{d} k={k} (indices differing from float64)", float((idx16.cpu() != ref_i).sum()), 0))
        res = nearest_code(q.to(dev), x.to(dev))
        checks.append((f"nearest_code {n}x{m}x{d}", float((res.dist.cpu().double() - ref_d[:, 0]).abs().max()), 1e-3))
        r = reference.sqdist_exact(x[:50], x[:50]).float().kthvalue(3, 1).values
        bc = ball_count(q.to(dev), x[:50].to(dev), r.to(dev))
        checks.append((f"ball_count {n}x50x{d}", float((bc.count.cpu() != reference.ball_count_exact(q, x[:50], r)[0]).sum()), 0))
    keys = torch.rand(3000 if DEVICE == "cuda" else 300, 147, generator=g)
    qs = keys + 0.05 * torch.randn(keys.shape, generator=g)
    got = patch_nn(qs.to(dev), keys.to(dev), 0.005 * 147).cpu()
    want = patch_nn(qs, keys, 0.005 * 147, backend="torch")
    checks.append(("patch_nn 3000x3000x147 (index agreement)", float((got != want).double().mean()), 0.01))
    src = torch.rand(2, 3, 40, 50, generator=g)
    idx = torch.randint(0, 34 * 44, (2, 30, 20), generator=g)
    checks.append(("fold_patches", float((fold_patches(src.to(dev), idx.to(dev), 7).cpu()
                                         - reference.fold_patches_reference(src, idx, 7)).abs().max()), 1e-5))
    mu, lv, eps = (torch.randn(64, 100, generator=g) for _ in range(3))
    z, kl = reparameterize(mu.to(dev), lv.to(dev), eps.to(dev))
    zr, klr = reference.reparameterize_reference(mu, lv, eps)
    checks.append(("reparameterize", float((z.cpu() - zr).abs().max() + (kl.cpu() - klr).abs().max()), 1e-4))
    lines += ["## Correctness on CUDA tensors (float64 reference)", "", "| check | max error | allowed | |",
              "|---|--:|--:|---|"]
    ok = True
    for name, err, tol in checks:
        good = err <= tol
        ok &= good
        lines.append(f"| {name} | {err:.3g} | {tol} | {'ok' if good else 'FAIL'} |")
    lines.append("")
    return ok


def speed(lines, results):
    from fastgen.ops import knn, nearest_code, patch_nn
    from fastgen.ops.baselines import knn_cdist, patch_nn_two_pass
    dev = DEVICE
    rows = []
    sizes = ((14884, 14884, 147, 10), (16384, 1024, 64, 1), (65536, 8192, 256, 1)) if DEVICE == "cuda" else \
        ((500, 400, 16, 3),)
    for n, m, d, k in sizes:
        q, x = torch.randn(n, d, device=dev), torch.randn(m, d, device=dev)
        t_fast = timed(lambda: knn(q, x, k))
        t_torch = timed(lambda: knn_cdist(q, x, k))
        row = dict(op="knn (exact fp32)", shape=f"{n}x{m}x{d} k={k}", fastgen_ms=t_fast * 1e3, torch_ms=t_torch * 1e3)
        if DEVICE == "cuda":   # what exactness costs: the plain fp32-ranking kernel (knn's path for k > 128)
            from fastgen.ops.triton.knn import knn_triton
            rows.append(dict(op="knn fp32 plain kernel (fp32 ranking)", shape=row["shape"],
                             fastgen_ms=timed(lambda: knn_triton(q[None], x[None], k, False)) * 1e3, torch_ms=t_torch * 1e3))
        # precision="bf16": the tensor-core screen plus the float64 re-rank (exact)
        rows.append(dict(op="knn bf16 (exact)", shape=row["shape"], fastgen_ms=timed(lambda: knn(q, x, k, precision="bf16")) * 1e3,
                         torch_ms=t_torch * 1e3))
        try:
            import faiss
            res = faiss.StandardGpuResources()
            index = faiss.GpuIndexFlatL2(res, d)
            index.add(x.cpu().numpy())
            qn = q.cpu().numpy()
            row["faiss_gpu_ms"] = timed(lambda: index.search(qn, k)) * 1e3
        except Exception as e:  # noqa: BLE001 -- faiss-gpu is optional
            row["faiss_gpu_ms"] = f"skipped ({type(e).__name__})"
        rows.append(row)
    # batched, one query per element (conditional IMLE's search: B in the hundreds, N = 1)
    bsz = 512 if DEVICE == "cuda" else 16
    qb, xb = torch.randn(bsz, 1, 64, device=dev), torch.randn(bsz, 300, 64, device=dev)
    rows.append(dict(op="knn batched", shape=f"{bsz}x(1x300x64) k=1", fastgen_ms=timed(lambda: knn(qb, xb, 1)) * 1e3,
                     torch_ms=timed(lambda: torch.cdist(qb, xb).argmin(-1)) * 1e3))
    x, cb = torch.randn(32768 if DEVICE == "cuda" else 512, 64, device=dev), torch.randn(512, 64, device=dev)
    rows.append(dict(op="nearest_code", shape=f"{x.shape[0]}x{cb.shape[0]}x64", fastgen_ms=timed(lambda: nearest_code(x, cb)) * 1e3,
                     torch_ms=timed(lambda: torch.cdist(x, cb).argmin(1)) * 1e3))
    keys = torch.rand(62500 if DEVICE == "cuda" else 500, 147, device=dev)
    qs = keys + 0.05 * torch.randn_like(keys)
    t_two_pass = timed(lambda: patch_nn_two_pass(qs, keys, 0.735), 3) * 1e3
    pn_shape = f"{keys.shape[0]}x{keys.shape[0]}x147"
    rows.append(dict(op="patch_nn", shape=pn_shape, fastgen_ms=timed(lambda: patch_nn(qs, keys, 0.735), 3) * 1e3,
                     torch_ms=t_two_pass))
    rows.append(dict(op="patch_nn bf16 (exact)", shape=pn_shape,
                     fastgen_ms=timed(lambda: patch_nn(qs, keys, 0.735, precision="bf16"), 3) * 1e3, torch_ms=t_two_pass))
    # the other ops against their plain-torch forms on the GPU
    from fastgen.nn import VectorQuantizer
    from fastgen.ops import fold_patches, reparameterize
    from fastgen.ops.baselines import reparameterize_unfused
    from fastgen.ops.reference import fold_patches_reference
    src = torch.rand(1, 3, 427 if DEVICE == "cuda" else 40, 640 if DEVICE == "cuda" else 50, device=dev)
    hq, wq = src.shape[2] - 6, src.shape[3] - 6
    fidx = torch.randint(0, hq * wq, (1, hq, wq), device=dev)
    rows.append(dict(op="fold_patches", shape=f"3x{src.shape[2]}x{src.shape[3]} p=7",
                     fastgen_ms=timed(lambda: fold_patches(src, fidx, 7)) * 1e3,
                     torch_ms=timed(lambda: fold_patches_reference(src, fidx, 7)) * 1e3))
    mu, lv, eps = (torch.randn(256, 4096 if DEVICE == "cuda" else 64, device=dev) for _ in range(3))
    rows.append(dict(op="reparameterize", shape=f"{tuple(mu.shape)}", fastgen_ms=timed(lambda: reparameterize(mu, lv, eps)) * 1e3,
                     torch_ms=timed(lambda: reparameterize_unfused(mu, lv, eps)) * 1e3))
    vq = VectorQuantizer(512, 64).to(dev)
    z = torch.randn(32768 if DEVICE == "cuda" else 512, 64, device=dev, requires_grad=True)
    vq_torch = VectorQuantizer(512, 64, backend="torch").to(dev)
    rows.append(dict(op="VectorQuantizer fwd+bwd", shape=f"{z.shape[0]}x512x64",
                     fastgen_ms=timed(lambda: vq(z).quantized.sum().backward()) * 1e3,
                     torch_ms=timed(lambda: vq_torch(z).quantized.sum().backward()) * 1e3))
    lines += ["## Speed on the GPU (median ms)", "", "| op | shape | fastgen | torch | faiss-gpu |", "|---|---|--:|--:|--:|"]
    for r in rows:
        fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
        lines.append(f"| {r['op']} | {r['shape']} | {fmt(r['fastgen_ms'])} | {fmt(r['torch_ms'])} | "
                     f"{fmt(r.get('faiss_gpu_ms', ''))} |")
    lines.append("")
    results["speed"] = rows


def gpnn(lines, out_dir):
    from sklearn.datasets import load_sample_image

    from fastgen.images import save_image
    from fastgen.models import GPNN
    x = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1).float().div(255).to(DEVICE)
    if DEVICE != "cuda":            # the smoke run: a small image
        x = torch.nn.functional.interpolate(x[None], size=(32, 48), mode="area")[0]
    sync()
    t = time.perf_counter()
    y = GPNN().sample(x, 1, seed=0, progress=False)[0]
    sync()
    dt = time.perf_counter() - t
    save_image(y.cpu(), os.path.join(out_dir, "gpnn_china_full.png"))
    lines += [f"## GPNN, one sample of china.jpg ({x.shape[1]} x {x.shape[2]})", "", f"{dt:.1f} s; gpnn_china_full.png", ""]


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing to check", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU smoke run (GPU_CHECK_DEVICE=cpu)"
    lines = [f"# fastgen GPU check: {name}", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}", ""]
    results = {}
    for name, title in (("build.txt", "Build against this torch"), ("test_cuda.txt", "tests/test_cuda.py")):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):   # written by gpu_check.sh
            with open(path) as f:
                tail = f.read().strip().splitlines()[-3:]
            lines += [f"## {title}", "", "```", *tail, "```", ""]
    ok = correctness(lines)
    speed(lines, results)
    gpnn(lines, out_dir)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu-check"))
