"""fastgen.ops.fold_patches against the unfold/gather/fold reference in float64."""
import pytest
import torch

from conftest import backends
from fastgen.ops import fold_patches, reference
from helpers import assert_close

BACKENDS = backends()  # triton where it runs (under TRITON_INTERPRET=1 on this machine)
TRITON = [b for b in BACKENDS if b == "triton"]
CHECKED = [b for b in BACKENDS if b != "torch"]  # the torch reference makes only the shared checks

# (B, C, Hs, Ws, Hq, Wq, p): the Triton kernel's tiles are 4 channels x 256 flattened
# output pixels, so C = 5 needs two channel tiles and 20 x 31 = 620 pixels end in a
# partial pixel tile; the query grid may be larger than the source, and a source one
# patch wide has a single patch column.
SHAPES = [(1, 1, 1, 1, 1, 1, 1), (2, 3, 9, 11, 5, 7, 3), (1, 3, 20, 17, 14, 25, 7),
          (2, 5, 6, 9, 4, 13, 1), (3, 1, 10, 8, 17, 3, 7), (2, 3, 7, 4, 3, 6, 4)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, dtype, tol, shape):
    B, C, Hs, Ws, Hq, Wq, p = shape
    src = torch.rand(B, C, Hs, Ws).to(dtype)
    nsrc = (Hs - p + 1) * (Ws - p + 1)
    idx = torch.randint(0, nsrc, (B, Hq, Wq))
    out = fold_patches(src, idx, p, backend=backend)
    assert out.shape == (B, C, Hq + p - 1, Wq + p - 1) and out.dtype == dtype
    assert_close(out, reference.fold_patches_reference(src, idx, p), tol, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    # GPNN folds from a batch-expanded source (batch stride 0); idx here is a transposed view
    src = torch.rand(1, 3, 11, 9)
    idx = torch.randint(0, 7 * 5, (2, 8, 6)).transpose(1, 2)
    out = fold_patches(src.expand(2, -1, -1, -1), idx, 5, backend=backend)
    assert_close(out, reference.fold_patches_reference(src.expand(2, -1, -1, -1), idx, 5), 1e-5, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_choice_reproduces_the_source(backend):
    src = torch.rand(3, 12, 15)
    p = 5
    Hq, Wq = 12 - p + 1, 15 - p + 1
    idx = torch.arange(Hq * Wq).view(Hq, Wq)  # every query copies its own position
    assert_close(fold_patches(src, idx, p, backend=backend), src, 1e-6, 1e-6)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_writes_every_pixel(backend):
    # the launcher writes into a NaN-poisoned buffer: any pixel the grid misses stays NaN
    from fastgen.ops.triton.fold_patches import _launch_fold_patches
    src = torch.rand(2, 5, 13, 10)
    idx = torch.randint(0, 9 * 6, (2, 19, 14))
    out = torch.full((2, 5, 23, 18), float("nan"))
    _launch_fold_patches(src, idx, 5, out)
    assert_close(out, reference.fold_patches_reference(src, idx, 5), 1e-5, 1e-5)


@pytest.mark.parametrize("backend", TRITON)
def test_raw_triton_op_reads_nothing_for_an_out_of_range_idx(backend):
    # fold_patches checks idx's range before launching; the raw op trusts it, but a bad
    # value must still read nothing: the pixels its query position covers come out NaN
    from fastgen.ops.triton.fold_patches import fold_patches_triton
    src = torch.rand(1, 2, 6, 6)
    idx = torch.zeros(1, 4, 4, dtype=torch.long)
    idx[0, 1, 2] = 10 ** 12
    idx[0, 3, 3] = -5
    out = fold_patches_triton(src, idx, 3)
    covered = torch.zeros(6, 6, dtype=torch.bool)
    covered[1:4, 2:5] = True
    covered[3:6, 3:6] = True
    assert bool(out[0, :, covered].isnan().all())
    assert bool(out[0, :, ~covered].isfinite().all())


def test_opcheck():
    src = torch.rand(1, 2, 8, 9)
    idx = torch.randint(0, 4 * 5, (1, 6, 3))
    torch.library.opcheck(torch.ops.fastgen.fold_patches.default, (src, idx, 5),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", TRITON)
def test_triton_op_opcheck(backend):
    from fastgen.ops.triton.fold_patches import fold_patches_triton  # noqa: F401  (registers the op)
    src = torch.rand(2, 3, 8, 9)
    idx = torch.randint(0, 4 * 5, (2, 6, 3))
    torch.library.opcheck(torch.ops.fastgen.fold_patches_triton.default, (src, idx, 5))
    idx1 = torch.randint(0, 8 * 9, (2, 4, 5))
    torch.library.opcheck(torch.ops.fastgen.fold_patches_triton.default, (src.half(), idx1, 1))


@pytest.mark.parametrize("backend", CHECKED)
@pytest.mark.parametrize("call,exc,msg", [
    (lambda be: fold_patches(torch.rand(3, 8, 8), torch.zeros(2, 2, dtype=torch.long), 9, backend=be), ValueError, "smaller than one patch"),
    (lambda be: fold_patches(torch.rand(3, 8, 8), torch.full((2, 2), 999), 3, backend=be), ValueError, r"idx values must be in \[0, 36\)"),
    (lambda be: fold_patches(torch.rand(3, 8, 8), torch.full((2, 2), 36), 3, backend=be), ValueError, "idx values"),
    (lambda be: fold_patches(torch.rand(3, 8, 8), torch.full((2, 2), -1), 3, backend=be), ValueError, "idx values"),
    (lambda be: fold_patches(torch.rand(3, 8, 8), torch.zeros(2, 2), 3, backend=be), TypeError, "idx must be int64"),
    (lambda be: fold_patches(torch.rand(3, 8, 8).double(), torch.zeros(2, 2, dtype=torch.long), 3, backend=be), TypeError, "source must be float32"),
    (lambda be: fold_patches(torch.rand(2, 3, 8, 8), torch.zeros(3, 2, 2, dtype=torch.long), 3, backend=be), ValueError, "idx has batch size 3"),
    (lambda be: fold_patches(torch.rand(8, 8), torch.zeros(2, 2, dtype=torch.long), 3, backend=be), ValueError, "source must be"),
    (lambda be: fold_patches(torch.rand(3, 8, 8), torch.zeros(2, dtype=torch.long), 3, backend=be), ValueError, "idx must be 2-D"),
    (lambda be: fold_patches(torch.rand(3, 8, 8), torch.zeros(2, 2, dtype=torch.long), 0, backend=be), ValueError, "patch_size"),
    (lambda be: fold_patches(torch.rand(3, 8, 8), torch.zeros(0, 3, dtype=torch.long), 2, backend=be), ValueError, "empty query grid"),
    (lambda be: fold_patches(torch.rand(3, 8, 8), torch.zeros(2, 2, dtype=torch.long, device="meta"), 2, backend=be), ValueError, "idx is on meta"),
    (lambda be: fold_patches(torch.rand(3, 8, 8, requires_grad=True), torch.zeros(2, 2, dtype=torch.long), 2, backend=be), ValueError, "not differentiable"),
])
def test_bad_inputs(backend, call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(backend)


def test_raw_op_checks_the_query_grid_and_devices():
    with pytest.raises(ValueError, match="empty query grid"):
        torch.ops.fastgen.fold_patches(torch.rand(1, 1, 4, 4), torch.zeros(1, 0, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.fastgen.fold_patches(torch.rand(1, 1, 4, 4), torch.zeros(1, 2, 2, dtype=torch.long, device="meta"), 2)
