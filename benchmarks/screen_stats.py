"""What the bf16 screen of precision="bf16" on the triton backend (fastgen/ops/certified.py)
leaves to the float64 re-rank, at realistic sizes, on the CPU: the screen's arithmetic
emulated in torch (inputs rounded to bf16, products summed in float64 -- the kernel sums
in fp32, which the bound covers; its E per row and key tile), its slots (the KC smallest
lower bounds), run through the package's own stages (`certified.knn_screened` with the
kernel swapped for this emulation). Per case and precision: the rows the bf16 screen could
not settle (sent to the fp32 stage), the rows left to the float64 sweep, the keys re-ranked
in float64 per row, and whether the answer equals the cpp backend's exact one;
precision="fp32" (knn's default on the triton backend) is the fp32 screen alone. This predicts the GPU cost without a GPU: screen
flops at the bf16 tensor-core rate, the fp32 rows again at the fp32 rate, KC x D float64
multiply-adds per row, M x D per swept row.

    python benchmarks/screen_stats.py            # writes a Markdown table to stdout
"""
import sys

import torch
import torch.nn.functional as F

from fastgen.ops import certified, knn
from fastgen.ops.baselines import centering_shift
from fastgen.ops.triton.screen import screen_blocks


def emulated_screen(queries, keys, weights, kc, exclude_self, coef, slack, fp32, rows=512):
    """fastgen::screen_triton computed in torch, (B, N, D) / (B, M, D) -> (lower, idx)
    (B, N, kc): inputs centred in fp32, rounded to bf16 (unless fp32), products summed in
    float64; E per row and key tile; the kc smallest lower bounds, ties to the lower index."""
    assert weights is None and not exclude_self
    B, N, D = queries.shape
    M = keys.shape[1]
    block_m = screen_blocks(D, kc)[1]
    out_v = torch.empty(B, N, kc)
    out_i = torch.empty(B, N, kc, dtype=torch.long)
    for b in range(B):
        mu = centering_shift(keys[b:b + 1])[0]
        qc, kcent = (queries[b] - mu).float(), (keys[b] - mu).float()
        qr, kr = (qc.double(), kcent.double()) if fp32 else (qc.bfloat16().double(), kcent.bfloat16().double())
        k_sq = kcent.double().square().sum(1)
        bt = F.pad(k_sq.sqrt(), (0, (-M) % block_m)).view(-1, block_m).amax(1).repeat_interleave(block_m)[:M]
        for s in range(0, N, rows):
            a = qc[s:s + rows].double().norm(dim=1, keepdim=True)
            lower = k_sq[None] - 2 * qr[s:s + rows] @ kr.T - (coef * (a + bt[None]) ** 2 + slack)
            v, i = torch.sort(lower, dim=1, stable=True)
            out_v[b, s:s + rows], out_i[b, s:s + rows] = v[:, :kc].float(), i[:, :kc]
    return out_v, out_i


def case(name, q, k, kk):
    want = knn(q, k, kk, backend="cpp").idx
    cells, same = [], True
    for fp32 in (False, True):
        certified.reset_stats()
        _, got = certified.knn_screened(q[None], k[None], kk, False, fp32=fp32)
        same = same and torch.equal(got[0], want)
        st = certified.STATS
        pct = lambda key: f"{100 * st[key] / st['rows']:.2f} %"   # noqa: E731
        cells += ([] if fp32 else [pct("fp32_rows")]) + [pct("wide_rows"), pct("swept_rows"),
                                                          f"{st['candidates'] / st['rows']:.1f}"]
    return (f"| {name} | {q.shape[0]} x {k.shape[0]} x {q.shape[1]} | {kk} | {certified.slots(kk)} | "
            + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")


def image_patches(name, size, patch=7):
    from sklearn.datasets import load_sample_image
    img = torch.from_numpy(load_sample_image(name).copy()).permute(2, 0, 1).float()[None] / 255
    img = F.interpolate(img, size=size, mode="area")
    return F.unfold(img, patch).transpose(1, 2)[0].contiguous()


def main():
    torch.manual_seed(0)
    certified.screen_triton = emulated_screen      # the package's stages, with this screen
    lines = ["| data | N x M x D | k | slots | bf16: rows to the fp32 stage | bf16: rows to 256 slots | "
             "bf16: rows swept in float64 | bf16: keys re-ranked per row | fp32: rows to 256 slots | fp32: rows swept | "
             "fp32: keys re-ranked per row | = cpp exact (both) |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for d in (64, 256):
        q, k = torch.randn(4096, d), torch.randn(16384, d)
        for kk in (1, 10):
            lines.append(case("Gaussian", q, k, kk))
    china = image_patches("china.jpg", (96, 144))
    flower = image_patches("flower.jpg", (96, 144))
    for kk in (1, 10):
        lines.append(case("flower patches vs china patches (7x7x3)", flower[::3].contiguous(), china, kk))
    noisy = china + 0.05 * torch.randn_like(china)
    lines.append(case("china patches + noise 0.05 vs china (GPNN-like)", noisy[::3].contiguous(), china, 1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
