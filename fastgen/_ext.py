"""Loads the compiled extension once and says why it is missing when it is."""
import warnings

try:
    from fastgen import _C  # noqa: F401  (registers torch.ops.fastgen.*)
    CPP_AVAILABLE = True
    CPP_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    CPP_AVAILABLE = False
    CPP_ERROR = f"{type(exc).__name__}: {exc}"

_warned = False


def warn_fallback_once():
    """One warning, not silence and not a flood, when ops fall back to the reference."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "fastgen's C++ extension is not available (" + str(CPP_ERROR) + "); "
            "ops fall back to the pure-PyTorch reference. Build it with "
            "`pip install -e . --no-build-isolation` and check `fastgen doctor`.",
            RuntimeWarning, stacklevel=3)


def build_info():
    return dict(_C.build_info()) if CPP_AVAILABLE else {}
