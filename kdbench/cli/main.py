"""The ``kdbench`` command: run, validate, ls, leaderboard, plugins.

User errors print one line (``kdbench: error: ...``) and exit with a distinct code (see
:class:`kdbench.contract.errors.ExitCode`), no traceback; ``--traceback`` or ``KDBENCH_DEBUG=1`` shows it.
"""

from __future__ import annotations

import os
import sys

from kdbench.cli.args import build_parser, default_cache_dir, env_debug
from kdbench.contract.errors import ExitCode, KdbenchError


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (:class:`kdbench.contract.errors.ExitCode`, as the README lists).

    A handled error prints one line; any other exception is a bug: one line, exit 3, and
    ``--traceback`` (or ``KDBENCH_DEBUG=1``) shows where. A closed stdout (``kdbench ... | head``)
    ends the command quietly.
    """
    debug = "--traceback" in (argv if argv is not None else sys.argv[1:]) or env_debug()
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return int(ExitCode.OK)
    except KdbenchError as exc:
        if debug:
            raise
        print(f"kdbench: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("kdbench: interrupted; finished cells are saved, rerun to resume", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:
        if debug:
            raise
        text = " ".join(str(exc).split())
        print(f"kdbench: internal error: {type(exc).__name__}: {text[:300]} (a bug in kdbench or a "
              "plugin; rerun with --traceback to see where)", file=sys.stderr)
        return int(ExitCode.INTERNAL_ERROR)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:  # argparse exits (usage errors: 4, --help: 0); return the code instead
        args = parser.parse_args(argv)
        if args.command is None:
            args = parser.parse_args(["run", *(argv or [])])
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else int(ExitCode.USAGE_ERROR)
    if args.command == "ls" and args.what != "suites":
        from kdbench.cli import lscache

        listing = lscache.lookup(default_cache_dir(), args)
        if listing is not None:  # warm: no plugin (and no torch) import
            sys.stdout.write(listing)
            return int(ExitCode.OK)
    from kdbench.cli import commands

    return int(getattr(commands, f"cmd_{args.command}")(args))
