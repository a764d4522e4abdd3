"""Python-side argument checks: every error names the argument it is about."""
import torch

from fastgen.ops.baselines import centering_shift

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PRECISIONS = ("fp32", "bf16")


def points(t, name, ndims=(2, 3)):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {t.layout} (call .to_dense())")
    if t.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name} has zero features (last dimension is 0)")


def same_kind(a, a_name, b, b_name):
    if a.device != b.device:
        raise ValueError(f"{a_name} is on {a.device} but {b_name} is on {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} is {a.dtype} but {b_name} is {b.dtype}; cast one of them")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{a_name} has D={a.shape[-1]} features but {b_name} has D={b.shape[-1]}")


def finite(t, name):
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def distance_inputs(queries, q_name, keys, k_name):
    """The rule every backend applies before computing distances (the C++ engine checks
    the same in operands.cpp): finite values, and after centring both sets on
    baselines.centering_shift(keys), 4 x every squared norm a finite float32 -- else a
    distance ||q - k||^2 <= 2||q||^2 + 2||k||^2 can overflow and the ranking is junk
    (inf everywhere, index 0, an out-of-range index on a GPU). (N, D) or (B, N, D)."""
    if queries.numel() == 0 or keys.numel() == 0:
        return
    q3 = queries if queries.dim() == 3 else queries.unsqueeze(0)
    k3 = keys if keys.dim() == 3 else keys.unsqueeze(0)
    mu = centering_shift(k3).unsqueeze(1)
    # one pass per set (one when they are the same tensor): NaN/inf also fail the norm
    # test, and only then is the set scanned again to say which of the two it was
    for t, name in ((k3, k_name),) + (() if queries is keys else ((q3, q_name),)):
        norms = (t.float() - mu).square_().sum(-1)
        if not bool(torch.isfinite(norms * 4).all()):
            finite(t, name)
            raise ValueError(f"{name} has values too large for float32 squared distances (a squared norm "
                             "overflows); rescale the data")


def index_range(t, name, n, what):
    """int64 t with every value in [0, n): a TypeError / ValueError naming `name` (what
    the indices point at goes in the message). One host sync for both ends."""
    if t.dtype != torch.long:
        raise TypeError(f"{name} must be int64, got {t.dtype}")
    if t.numel() > 0:
        lo, hi = torch.stack(torch.aminmax(t)).tolist()
        if lo < 0 or hi >= n:
            raise ValueError(f"{name} values must be in [0, {n}) ({what}), got values in [{lo}, {hi}]")


def positive_int(v, name, minimum=1):
    """An int (not bool) >= minimum, or a ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")


def flag(v, name):
    """None (choose automatically), True or False."""
    if v is not None and not isinstance(v, bool):
        raise TypeError(f"{name} must be True, False or None, got {type(v).__name__}")


def alpha(a, name="alpha"):
    """patch_nn's alpha as a float, or None: float32 weights 1 / (alpha + colmin) must
    neither overflow nor vanish. name: the argument's name in the message."""
    if a is None:
        return None
    if isinstance(a, (bool, str, bytes)):
        raise TypeError(f"{name} must be a number or None, got {type(a).__name__}")
    try:
        a = float(a)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or None, got {type(a).__name__}") from None
    if not (1e-30 <= a <= 1e30):
        raise ValueError(f"{name} must be in [1e-30, 1e30] or None, got {a}")
    return a


def hint(h, q3, num_keys, squeeze):
    """patch_nn's hint as a (B, N) int64 tensor, or a ValueError/TypeError naming it."""
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"hint must be a torch.Tensor of key indices or None, got {type(h).__name__}")
    want = tuple(q3.shape[1:2]) if squeeze else tuple(q3.shape[:2])
    if tuple(h.shape) != want:
        raise ValueError(f"hint must have shape {want} (one key index per query), got {tuple(h.shape)}")
    if h.device != q3.device:
        raise ValueError(f"hint is on {h.device} but queries are on {q3.device}")
    index_range(h, "hint", num_keys, "key indices")
    return h.reshape(q3.shape[0], q3.shape[1])


def precision(p):
    if p not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {p!r}")


def point_sets(queries, keys, q_name="queries", k_name="keys", ndims=(2, 3)):
    """queries (N, D) / (B, N, D) and keys (M, D) / (B, M, D) of one dtype, device and D."""
    points(queries, q_name, ndims)
    points(keys, k_name, ndims)
    if queries.dim() != keys.dim():
        raise ValueError(f"{q_name} is {queries.dim()}-D but {k_name} is {keys.dim()}-D; both must be 2-D or both 3-D")
    same_kind(queries, q_name, keys, k_name)
    if queries.dim() == 3 and queries.shape[0] != keys.shape[0]:
        raise ValueError(f"{q_name} has batch size {queries.shape[0]} but {k_name} has {keys.shape[0]}")


def fake_point_sets(queries, keys, q_name="queries", k_name="keys"):
    """What the C++ kernels check on (B, N, D) x (B, M, D) inputs, repeated by the fake
    (meta) kernels so torch.compile / meta tracing refuses what a real call refuses."""
    one_device(**{q_name: queries, k_name: keys})
    point_sets(queries, keys, q_name, k_name, ndims=(3,))


def one_device(**tensors):
    """Fake (meta) kernels run instead of the real ones whenever any input is a meta
    tensor, so they repeat the device check the real kernels would have made."""
    given = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(given.values())) > 1:
        raise ValueError("inputs must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in given.items()))
