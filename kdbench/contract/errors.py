"""Handled errors and exit codes.

A :class:`KdbenchError` is a user mistake: the CLI prints its message on one line (``kdbench: error:
...``) and exits with its ``exit_code``, without a traceback. Any other exception is a bug.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of the ``kdbench`` command."""

    OK = 0
    RUNS_FAILED = 1
    INTERRUPTED = 2
    INTERNAL_ERROR = 3
    USAGE_ERROR = 4
    NOTHING_TO_RUN = 5
    CONFIG_ERROR = 6
    PLUGIN_ERROR = 7
    DATA_ERROR = 8


class KdbenchError(Exception):
    """A handled error: printed as one line, no traceback."""

    exit_code: ExitCode = ExitCode.USAGE_ERROR


class ConfigError(KdbenchError):
    """The configuration is invalid; ``problems`` lists every problem found."""

    exit_code = ExitCode.CONFIG_ERROR

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            lines = "\n".join(f"  {p}" for p in self.problems)
            msg = f"config is invalid ({len(self.problems)} problems):\n{lines}"
        super().__init__(msg)


class PluginError(KdbenchError):
    """A plugin failed to load or registered something invalid."""

    exit_code = ExitCode.PLUGIN_ERROR


class UnknownNameError(ConfigError):
    """A registry lookup failed; the message suggests close names."""


class DuplicateNameError(PluginError):
    """Two plugins registered the same name."""


class DataError(KdbenchError):
    """A data file is missing or malformed; the message names the file (and line) and a fix."""

    exit_code = ExitCode.DATA_ERROR


class NotApplicable(Exception):
    """Raised by a component when a cell cannot run (e.g. Meta-KD on a single-domain task).

    The runner records the cell as ``n-a`` with ``str(exc)`` as the reason.
    """
