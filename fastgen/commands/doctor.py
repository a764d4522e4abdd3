"""`fastgen doctor`: which backends are live, the build flags, the CPU features."""
import json


def add_parser(sub):
    p = sub.add_parser("doctor", help="report live backends, build flags and CPU features")
    p.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    p.add_argument("--gpu-plan", action="store_true",
                   help="compile every Triton kernel configuration for A100 (sm_80) and H100/H200 (sm_90) -- no GPU "
                        "needed -- and print registers, spills, shared memory and occupancy (about 2 minutes)")
    p.set_defaults(func=run)


def run(args):
    if args.gpu_plan:
        return run_gpu_plan(args)
    from fastgen.info import format_info, info
    d = info()
    print(json.dumps(d, indent=2, default=str) if args.json else format_info(d))
    return 0 if d["backends"]["cpp"]["live"] else 1


def run_gpu_plan(args):
    import os
    import subprocess
    import sys
    # the kernels must be real @triton.jit functions, not the interpreter's: a fresh process
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = ("import json, sys; from fastgen.gpu_plan import plan, format_plan; rows = plan(); "
            f"print(json.dumps(rows) if {bool(args.json)} else format_plan(rows)); "
            "sys.exit(1 if any(r['error'] or r['spill_stores'] or r['spill_loads'] for r in rows) else 0)")
    return subprocess.run([sys.executable, "-c", code], env=env).returncode
