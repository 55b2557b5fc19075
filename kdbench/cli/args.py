"""The command line's parser and the helpers every subcommand shares."""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from kdbench.contract.errors import ExitCode

if TYPE_CHECKING:
    from kdbench.engine.manager import Host


EPILOG = textwrap.dedent("""\
    examples:
      kdbench run                                   # the offline quickstart suite -> runs/quickstart.md
      kdbench run --publish                         # ... into leaderboards/ (maintainers)
      kdbench run --suite glue-small --seeds 0      # a shipped suite, one seed
      kdbench run --suite my.toml train.epochs=2 loss.kd.temperature=4
      kdbench run --suite quickstart --dry-run      # print the plan
      kdbench ls methods
      kdbench leaderboard                           # regenerate leaderboards/*.md from results
      kdbench -p my_rule.py ls teacher-updates      # load a plugin file
    """)


class _Parser(argparse.ArgumentParser):
    """argparse with kdbench's usage exit code (4) instead of argparse's 2 ("interrupted")."""

    def error(self, message: str) -> NoReturn:
        self.exit(int(ExitCode.USAGE_ERROR), f"kdbench: error: {message}. Hint: {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands share the global plugin options)."""
    def plugin_options(p: argparse.ArgumentParser, top: bool) -> argparse.ArgumentParser:
        p.add_argument("-p", dest="plugins", action="append", default=[] if top else argparse.SUPPRESS,
                       metavar="PLUGIN", help="load a plugin module or .py file; -p no:NAME blocks one")
        p.add_argument("--traceback", action="store_true", default=False if top else argparse.SUPPRESS,
                       help="show tracebacks for errors")
        return p

    # subcommands accept the global options too, without resetting values given before them
    common = _Parser(add_help=False)
    plugin_options(common, top=False)
    parser = _Parser(prog="kdbench", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Knowledge-distillation benchmark with pluggable teacher-update rules.")
    plugin_options(parser, top=True)
    sub = parser.add_subparsers(dest="command")
    for name in ("run", "validate"):
        p = sub.add_parser(name, parents=[common], help="run the matrix" if name == "run" else "validate and print the plan")
        p.add_argument("--suite", default="quickstart", help="built-in suite name or TOML path (default: quickstart)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=2")
        p.add_argument("--methods", help="comma-separated subset of the suite's methods")
        p.add_argument("--tasks", help="comma-separated subset of the suite's tasks")
        p.add_argument("--students", help="comma-separated subset of the suite's students")
        p.add_argument("--seeds", help="comma-separated seeds (replaces the suite's)")
        p.add_argument("--results-dir", help="result files (default: runs/<suite>, or leaderboards/results/<suite> "
                                             "with --publish); the page goes beside it unless --out-dir")
        p.add_argument("--cache-dir", help="teachers, tokenised data, checkpoints (default: $KDBENCH_CACHE or ~/.cache/kdbench)")
        p.add_argument("--out-dir", help="a leaderboards-style folder: results in OUT/results/<suite>, page OUT/<suite>.md")
        if name == "run":
            p.add_argument("--publish", action="store_true",
                           help="write the published leaderboards/results/<suite> and leaderboards/<suite>.md "
                                "(default: the git-ignored runs/<suite> and runs/<suite>.md)")
            p.add_argument("--workers", type=int, metavar="N",
                           help="local executor: cells run in N single-threaded worker processes (default: one "
                                "per CPU core on CPU, 1 on a GPU); 1 = one after another in this process")
        p.add_argument("--device", default="auto", type=device_name,
                       help="default of cells whose train.device is auto: auto, cpu, cuda, cuda:N or mps")
        p.add_argument("--executor", default="local", help="local (default) or ray")
        p.add_argument("--executor-opt", action="append", default=[], metavar="key=value",
                       help="executor option, e.g. address=auto, num_gpus=1")
        p.add_argument("--retry-failed", action="store_true", help="rerun failed cells too")
        p.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms (same as train.deterministic=true teacher_train.deterministic=true)")
        p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
        p.add_argument("--no-leaderboard", action="store_true", help="do not render after the run")
        if name == "validate":
            p.add_argument("--data", action="store_true",
                           help="also read and check every planned task's files (no model is loaded)")
    ls = sub.add_parser("ls", parents=[common], help="list registered components")
    ls.add_argument("what", nargs="?", default="methods",
                    choices=["plugins", "tasks", "models", "students", "losses", "teacher-updates",
                             "methods", "executors", "suites"])
    lb = sub.add_parser("leaderboard", parents=[common], help="render leaderboards from result files")
    lb.add_argument("results", nargs="*", help="result directories (default: leaderboards/results/*)")
    lb.add_argument("--out-dir", default="leaderboards")
    lb.add_argument("--check", action="store_true", help="fail if a committed file differs from a fresh render")
    pl = sub.add_parser("plugins", parents=[common], help="JSON list of plugins and their hooks")
    pl.add_argument("--hook", help="only plugins implementing this hook")
    add_bench_parser(sub, [common])
    return parser


def at_least(low: int) -> Any:
    """argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def device_name(text: str) -> str:
    """argparse type: a device name ``train.device`` accepts."""
    from kdbench.contract.options import device_problem

    problem = device_problem("--device", text)
    if problem:
        raise argparse.ArgumentTypeError(problem.removeprefix("--device = "))
    return text


def add_bench_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """The ``kdbench bench`` subcommand's arguments."""
    p = sub.add_parser("bench", parents=parents, help="per-step cost of every method; runner overhead")
    p.add_argument("--shape", "--teacher", dest="shape", default="minilm", choices=["minilm", "tiny", "bert-base"],
                   help="minilm: ../shared/hf MiniLM-L6 + 2-layer student (falls back to tiny); bert-base: "
                        "12L-768 from a BertConfig + 6 layers, SDPA, T=128; tiny: the same at 4L-64 + 2")
    p.add_argument("--seq-len", type=at_least(0), default=0,
                   help="tokens per sequence (default: the shape's, 64 or 128)")
    p.add_argument("--attn", default="", choices=["", "eager", "sdpa"], help="attention (default: the shape's)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="train.precision of every step: auto = bf16 autocast on CUDA, fp32 on CPU (the CPU suites "
                   "set bf16)")
    p.add_argument("--warmup", type=at_least(0), default=0,
                   help="untimed steps per method (default: 1 CPU, 3 CUDA)")
    p.add_argument("--batch", type=at_least(1), default=32)
    p.add_argument("--repeats", type=at_least(1), default=3, help="timed steps per method (median reported)")
    p.add_argument("--device", default="cpu", type=device_name)
    p.add_argument("--threads", type=at_least(0), default=0, help="torch threads (default: all cores)")
    p.add_argument("--methods", help="comma-separated subset (method names or row labels)")
    p.add_argument("--overhead", action="store_true", help="benchmark runner overhead instead")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write the rows as JSON")
    return p


def make_host(args: argparse.Namespace) -> Host:
    """Host from -p arguments."""
    from kdbench.engine.manager import Host, make_plugin_manager

    extra = [p for p in args.plugins if not p.startswith("no:")]
    blocked = [p[3:] for p in args.plugins if p.startswith("no:")]
    return Host(make_plugin_manager(extra=extra, blocked=blocked))


def env_debug() -> bool:
    """True when ``KDBENCH_DEBUG`` asks for tracebacks."""
    return os.environ.get("KDBENCH_DEBUG", "") not in ("", "0")


def print_json(obj: Any) -> None:
    """Pretty JSON to stdout."""
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def default_cache_dir() -> Path:
    """$KDBENCH_CACHE or ~/.cache/kdbench."""
    return Path(os.environ.get("KDBENCH_CACHE") or Path.home() / ".cache" / "kdbench")
