"""The `fastgen` command line.

Each subcommand lives in the module that owns it and registers itself through a
`add_parser(subparsers)` function listed in COMMANDS; this file only wires them and
decides how errors reach the user.
"""
import argparse
import importlib
import sys
import traceback

# module path -> the function that adds its subcommand(s)
COMMANDS = [
    "fastgen.commands.doctor",
    "fastgen.commands.bench",
    "fastgen.commands.train",
    "fastgen.commands.sample",
    "fastgen.commands.eval",
    "fastgen.commands.gpnn",
]

# What bad input raises (a wrong argument, a missing or unreadable file, a backend that
# is not available): one line naming what is wrong. Anything else is a bug.
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError)


def is_internal(exc):
    """Errors that are fastgen's fault even when their type is a user error's: the C++
    checks that say so ("internal error ... please report")."""
    text = str(exc)
    return not isinstance(exc, USER_ERRORS) or "internal error" in text or "please report" in text


# the commands that may run under torchrun: each of their subcommands takes --timeout
TIMEOUT_COMMANDS = ("train", "gpnn sample")


def build_parser():
    parser = argparse.ArgumentParser(prog="fastgen", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of every error")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in COMMANDS:
        importlib.import_module(mod).add_parser(sub)
    add_timeout_option(parser)
    return parser


def add_timeout_option(parser):
    """--timeout MINUTES on every subcommand of TIMEOUT_COMMANDS (fastgen.distributed)."""
    def leaves(p, path):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, p
        for a in subs:
            seen = set()
            for name, child in a.choices.items():
                if id(child) not in seen:
                    seen.add(id(child))
                    yield from leaves(child, f"{path} {name}".strip())
    for path, p in leaves(parser, ""):
        if any(path == c or path.startswith(c + " ") for c in TIMEOUT_COMMANDS):
            p.add_argument("--timeout", type=float, default=None, metavar="MINUTES",
                           help="under torchrun: how long a rank waits for the others in a collective before "
                                "failing with an error naming the rank(s) that stopped answering "
                                "(default: $FASTGEN_TIMEOUT_MIN or 10)")


def apply_timeout(args):
    """Hands --timeout to fastgen.distributed (not kept in args: a resumed run may change it)."""
    minutes = vars(args).pop("timeout", None)
    if minutes is not None:
        from fastgen.distributed import set_timeout
        set_timeout(minutes)


def explained(exc):
    """A collective's timeout as fastgen.distributed says it (the rank(s) that stopped)."""
    mod = sys.modules.get("fastgen.distributed")
    return exc if mod is None else mod.explain_timeout(exc)


def explicit_flags(parser, argv):
    """The dests of the options written on the command line (not defaulted), also when
    abbreviated as argparse allows: a resumed run compares those with what it recorded."""
    words = {w.split("=", 1)[0] for w in argv if w.startswith("-")}
    found = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                stack.extend(a.choices.values())
            elif any(w == o or (w.startswith("--") and len(w) > 2 and o.startswith(w))
                     for w in words for o in a.option_strings):
                found.add(a.dest)
    return found


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args._explicit = explicit_flags(parser, argv)
    try:
        apply_timeout(args)
        return args.func(args) or 0
    except KeyboardInterrupt:
        # one line, no traceback; checkpoints are written atomically (a write in progress
        # finishes first), so the last one is whole
        hint = "; the last checkpoint is intact: rerun with --resume to continue" if args.command == "train" else ""
        print(f"fastgen {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 -- sorted into user errors and bugs below
        exc = explained(exc)
        if is_internal(exc):
            traceback.print_exc()
            print(f"fastgen {args.command}: internal error ({type(exc).__name__}); please report it "
                  "with the command line and the traceback above", file=sys.stderr)
            return 1
        if args.debug:
            traceback.print_exc()
        print(f"fastgen {args.command}: error: {exc}" + ("" if args.debug else " (--debug shows the traceback)"),
              file=sys.stderr)
        return 2
    finally:
        leave_process_group()


def leave_process_group():
    """Under torchrun a command that joined the group leaves it before the interpreter
    exits, which joins gloo's worker threads (see fastgen.distributed.import_dynamo_first):
    one still running at shutdown could abort a finished run with SIGABRT. Only the group
    fastgen made; a failure here is reported without hiding the command's outcome."""
    mod = sys.modules.get("fastgen.distributed")
    if mod is None:
        return
    try:
        mod.leave_group()
    except Exception as exc:  # noqa: BLE001 -- the command's own result or error matters more
        print(f"fastgen: warning: leaving the process group failed: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
