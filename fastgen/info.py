"""fastgen.info(): which backends are live, what the extension was built with, the CPU."""
import os
import platform

import torch

from fastgen import _ext
from fastgen.ops import checks


def cpu_features():
    """CPU model and the SIMD / matrix features the kernels can use, read at run time."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"]
    return {
        "model": model,
        "cores": os.cpu_count(),
        "features": {f: f in flags for f in wanted},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def info():
    """A dict describing the live backends and why a missing one is missing."""
    backends = {
        "cpp": {"live": _ext.CPP_AVAILABLE,
                "why_not": None if _ext.CPP_AVAILABLE else _ext.CPP_ERROR,
                "build": _ext.build_info()},
        "triton": {"live": checks.triton_available() and torch.cuda.is_available(),
                   "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
                   "why_not": None},
        "torch": {"live": True, "why_not": None},
    }
    t = backends["triton"]
    if not checks.triton_available():
        t["why_not"] = "triton is not installed (pip install triton)"
    elif not torch.cuda.is_available():
        t["why_not"] = ("no CUDA device; Triton kernels run here only under TRITON_INTERPRET=1 "
                        "(correctness checks, not speed)")
    import fastgen
    from fastgen.threads import fine_grained_thread_count, other_running_tasks
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "fastgen": fastgen.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load": {"loadavg_1_5_15": load, "other_running_tasks": other_running_tasks(),
                 "fine_grained_threads": fine_grained_thread_count()},
        "cpu": cpu_features(),
        "cuda": torch.cuda.is_available(),
        "backends": backends,
    }


def format_info(d=None):
    d = d or info()
    lines = [f"fastgen {d['fastgen']}  torch {d['torch']}  threads {d['threads']}",
             f"CPU: {d['cpu']['model']} ({d['cpu']['cores']} cores), torch capability "
             f"{d['cpu']['torch_cpu_capability']}",
             "CPU features: " + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in d['cpu']['features'].items()),
             f"CUDA device: {'yes' if d['cuda'] else 'no'}"]
    ld = d.get("load")
    if ld:
        avg = "unknown" if ld["loadavg_1_5_15"] is None else " ".join(map(str, ld["loadavg_1_5_15"]))
        others = "unknown" if ld["other_running_tasks"] is None else ld["other_running_tasks"]
        lines.append(f"load: average {avg} (1/5/15 min), other tasks running now {others}; threads: "
                     f"{d['threads']} for large kernels, {ld['fine_grained_threads']} for the pruned "
                     "searches' short regions (fastgen.threads)")
    for name, b in d["backends"].items():
        state = "live" if b["live"] else "not live"
        line = f"backend {name:7s} {state}"
        if b.get("why_not"):
            line += f"  ({b['why_not']})"
        lines.append(line)
        if name == "cpp" and b.get("build"):
            lines.append("    build: " + ", ".join(f"{k}={v}" for k, v in b["build"].items()))
    return "\n".join(lines)
