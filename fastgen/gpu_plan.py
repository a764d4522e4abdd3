"""Every Triton kernel of fastgen compiled for real GPUs -- with no GPU present -- and
what the compiled code needs: registers, spills, shared memory, and the occupancy those
allow (targets: sm_80 = A100, sm_90 = H100/H200). `fastgen doctor --gpu-plan` prints it; tests/test_gpu_compile.py fails on a
compile error, a spill, or shared memory past the target's limit.

Triton compiles an ASTSource for a chosen target (GPUTarget("cuda", 80|90, 32)) on the
CPU; its PTX is assembled once more by the ptxas Triton uses for that target (shipped in
the triton wheel) with `-v`, which reports registers and spills (Triton's own cubin keeps
no spill count readable without a GPU driver). What is compiled is every configuration
the launchers can choose (fastgen/ops/triton/*.py: block sizes from `blocks(D, KP)`, k padded to a power of
two, the dtypes the ops accept), so a GPU never meets a kernel nobody compiled.
"""
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

# per SM: registers, max shared memory per block (opt-in), max resident threads
LIMITS = {80: dict(regs=65536, smem=163 * 1024, threads=2048), 90: dict(regs=65536, smem=227 * 1024, threads=2048)}
DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


@dataclass
class Config:
    kernel: str          # module:function
    name: str            # what the table shows
    signature: dict      # argument -> Triton type
    constexprs: dict
    num_warps: int = 4


def _import(path):
    mod, fn = path.split(":")
    import importlib
    return getattr(importlib.import_module(mod), fn)


def _sig(fn, ptr_types, floats=()):
    """Triton types of fn's runtime arguments: pointers by name, listed floats fp32, ints i32."""
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            continue
        if p.name.endswith("_ptr"):
            sig[p.name] = ptr_types.get(p.name, "*fp32")
        else:
            sig[p.name] = "fp32" if p.name in floats else "i32"
    return sig


def configs():
    """Every (kernel, configuration) the launchers can choose."""
    from fastgen.ops import certified
    from fastgen.ops.triton.screen import screen_blocks
    from fastgen.ops.triton._common import BF16_DOT, DISTANCE_WARPS, DOT_PRECISION, FP32_DOT, blocks
    out = []
    knn = _import("fastgen.ops.triton.knn:_knn_kernel")
    cmin = _import("fastgen.ops.triton.patch_nn:_column_min_kernel")
    warg = _import("fastgen.ops.triton.patch_nn:_weighted_argmin_kernel")
    screen = _import("fastgen.ops.triton.screen:_screen_kernel")
    ball = _import("fastgen.ops.triton.ball_count:_ball_count_kernel")
    fold = _import("fastgen.ops.triton.fold_patches:_fold_patches_kernel")
    fwd = _import("fastgen.ops.triton.reparameterize:_fwd_kernel")
    bwd = _import("fastgen.ops.triton.reparameterize:_bwd_kernel")
    from fastgen.ops.triton.ball_count import BALL_BLOCK_M
    from fastgen.ops.triton.reparameterize import BLOCK as REP_BLOCK
    for dt, ptr in DTYPES.items():
        data = {"q_ptr": ptr, "k_ptr": ptr}
        W = DISTANCE_WARPS
        for D in sorted({16, 64}):   # the launchers' block choice may depend on D: every choice once
            if D != 16 and blocks(D) == blocks(16) and all(blocks(D, kp) == blocks(16, kp) for kp in (1, 32, 128)):
                continue
            for kp in (1, 2, 4, 8, 16, 32, 64, 128):          # k padded to a power of two
                for excl in (False, True):
                    bn, bm, bd = blocks(D, kp)
                    out.append(Config("fastgen.ops.triton.knn:_knn_kernel",
                                      f"knn {dt} KP={kp}{' exclude_self' if excl else ''}",
                                      _sig(knn, {**data, "idx_ptr": "*i64"}),
                                      dict(KP=kp, EXCLUDE_SELF=excl, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd,
                                           DOT_PRECISION=DOT_PRECISION), W))
            # the screen (fastgen/ops/certified.py), slots 16 .. 256: knn with k <= 128 in both precisions
            for kc in sorted({certified.slots(k) for k in (1, 8, 16, 32, 64, certified.MAX_K)}):
                # weighted screens are patch_nn's (k = 1) only
                for excl, weighted in ((False, False), (True, False)) + (((False, True),) if kc == certified.slots(1) else ()):
                    bn, bm, bd = screen_blocks(D, kc)
                    # the bf16 screen and the fp32 one (precision="bf16"'s second stage, and
                    # precision="fp32"'s only stage, with exclude_self too)
                    for mode, tag in ((BF16_DOT, "bf16 dot"), (FP32_DOT.value, "fp32 dot")):
                        out.append(Config("fastgen.ops.triton.screen:_screen_kernel",
                                          f"screen {dt} KC={kc} {tag}{' exclude_self' if excl else ''}"
                                          f"{' weighted' if weighted else ''}",
                                          _sig(screen, {**data, "val_ptr": "*fp32", "idx_ptr": "*i64"}, floats=("coef", "slack")),
                                          dict(KC=kc, EXCLUDE_SELF=excl, WEIGHTED=weighted, BLOCK_N=bn, BLOCK_M=bm,
                                               BLOCK_D=bd, DOT_PRECISION=DOT_PRECISION, SCREEN=mode), W))
            bn, bm, bd = blocks(D)
            tag = dt
            out.append(Config("fastgen.ops.triton.patch_nn:_column_min_kernel", f"column_min {tag}",
                              _sig(cmin, {**data, "row_ptr": "*i64"}),
                              dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, DOT_PRECISION=DOT_PRECISION), W))
            out.append(Config("fastgen.ops.triton.patch_nn:_weighted_argmin_kernel", f"weighted_argmin {tag}",
                              _sig(warg, {**data, "idx_ptr": "*i64"}),
                              dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, DOT_PRECISION=DOT_PRECISION), W))
            out.append(Config("fastgen.ops.triton.ball_count:_ball_count_kernel", f"ball_count {tag}",
                              _sig(ball, {"p_ptr": ptr, "c_ptr": ptr, "count_ptr": "*i32", "unsure_ptr": "*i32"},
                                   floats=("coef", "slack")),
                              dict(BLOCK_N=bn, BLOCK_M=BALL_BLOCK_M, BLOCK_D=bd, DOT_PRECISION=DOT_PRECISION), W))
        for bc in (1, 2, 4):
            out.append(Config("fastgen.ops.triton.fold_patches:_fold_patches_kernel", f"fold_patches {dt} BLOCK_C={bc}",
                              _sig(fold, {"src_ptr": ptr, "idx_ptr": "*i64", "out_ptr": ptr}),
                              dict(BLOCK_C=bc, BLOCK_P=256)))
        for has_eps in (False, True):
            rp = {"mu_ptr": ptr, "lv_ptr": ptr, "eps_ptr": ptr, "z_ptr": ptr, "partial_ptr": "*fp32"}
            out.append(Config("fastgen.ops.triton.reparameterize:_fwd_kernel", f"reparameterize fwd {dt} eps={has_eps}",
                              _sig(fwd, rp, floats=("lo", "hi")), dict(HAS_EPS=has_eps, BLOCK=REP_BLOCK)))
            rb = {"gz_ptr": ptr, "gk_ptr": "*fp32", "mu_ptr": ptr, "lv_ptr": ptr, "eps_ptr": ptr,
                  "gmu_ptr": ptr, "glv_ptr": ptr}
            out.append(Config("fastgen.ops.triton.reparameterize:_bwd_kernel", f"reparameterize bwd {dt} eps={has_eps}",
                              _sig(bwd, rb, floats=("lo", "hi")),
                              dict(HAS_GZ=True, HAS_GK=True, HAS_EPS=has_eps, BLOCK=REP_BLOCK)))
    return out


def compile_config(cfg, arch):
    """dict(name, arch, regs, spill_stores, spill_loads, shared, warps_per_sm, error): Triton
    compiles to PTX for the target, and the target's ptxas (the one Triton uses) reports
    registers and spills (`ptxas -v`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    row = dict(name=cfg.name, arch=arch, regs=None, spill_stores=None, spill_loads=None, shared=None,
               warps_per_sm=None, error=None)
    try:
        k = triton.compile(ASTSource(_import(cfg.kernel), cfg.signature, cfg.constexprs),
                           target=GPUTarget("cuda", arch, 32), options=dict(num_warps=cfg.num_warps))
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(k.asm["ptx"])
            res = subprocess.run([get_ptxas(arch).path, "-v", "--gpu-name", "sm_90a" if arch == 90 else f"sm_{arch}",
                                  ptx, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    except Exception as e:  # noqa: BLE001 -- reported in the table, failed by the test
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return row
    text = res.stdout + res.stderr
    m_regs = re.search(r"Used (\d+) registers", text)
    m_spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if res.returncode or not m_regs or not m_spill:
        row["error"] = f"ptxas: {text.strip().splitlines()[-1][:200] if text.strip() else res.returncode}"
        return row
    regs = int(m_regs.group(1))
    shared = int(getattr(k.metadata, "shared", 0) or 0)
    lim = LIMITS[arch]
    threads = 32 * cfg.num_warps
    by_regs = lim["regs"] // max(1, regs * threads)
    by_smem = lim["smem"] // shared if shared else 32
    blocks_per_sm = max(0, min(by_regs, by_smem, lim["threads"] // threads))
    row.update(regs=regs, spill_stores=int(m_spill.group(1)), spill_loads=int(m_spill.group(2)), shared=shared,
               warps_per_sm=blocks_per_sm * cfg.num_warps)
    return row


def plan(archs=(80, 90), only=None):
    """Compile every configuration for every target: a list of rows."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = []
    for cfg in configs():
        if only and only not in cfg.name:
            continue
        for arch in archs:
            rows.append(compile_config(cfg, arch))
    return rows


def format_plan(rows):
    head = "| kernel, config | target | registers | spill stores / loads (B) | shared (B) | warps / SM |"
    lines = [head, "|---|---|--:|--:|--:|--:|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['name']} | sm_{r['arch']} | compile error: {r['error']} | | | |")
        else:
            lines.append(f"| {r['name']} | sm_{r['arch']} | {r['regs']} | {r['spill_stores']} / {r['spill_loads']} | "
                         f"{r['shared']} | {r['warps_per_sm']} |")
    return "\n".join(lines)
