"""The `fastgen` command line.

Each subcommand lives in the module that owns it and registers itself through a
`add_parser(subparsers)` function listed in COMMANDS; this file only wires them.
"""
import argparse
import importlib
import sys

# module path -> the function that adds its subcommand(s)
COMMANDS = [
    "fastgen.commands.doctor",
    "fastgen.commands.bench",
    "fastgen.commands.train",
    "fastgen.commands.sample",
    "fastgen.commands.gpnn",
]


def build_parser():
    parser = argparse.ArgumentParser(prog="fastgen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in COMMANDS:
        importlib.import_module(mod).add_parser(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as exc:
        # user errors: one clear line, not a traceback
        print(f"fastgen {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
