"""`fastgen doctor`: which backends are live, the build flags, the CPU features."""
import json


def add_parser(sub):
    p = sub.add_parser("doctor", help="report live backends, build flags and CPU features")
    p.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    p.set_defaults(func=run)


def run(args):
    from fastgen.info import format_info, info
    d = info()
    print(json.dumps(d, indent=2, default=str) if args.json else format_info(d))
    return 0 if d["backends"]["cpp"]["live"] else 1
