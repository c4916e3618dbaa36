"""The project's one error hierarchy, and the policy every command-line tool applies to it.

- `BamError`: the base of every error this project raises on purpose.
- `UserError`: input the user can fix (a missing file, a flag out of range, a checkpoint that does
  not fit the flags). Tools print its message as one line, ``PROG: error: MESSAGE``, and exit 2.
  Its message names the culprit: the file, flag, tensor or field, and what was expected.
- Anything else (a bug here, in torch or in megatron-core) is not bad input: it propagates, so
  Python prints the traceback and the process exits 1.

Neither class is a ``ValueError``, so an unrelated ``ValueError`` from a library is never mistaken
for bad input.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Optional

EXIT_BAD_INPUT = 2


class BamError(Exception):
    """Base of the errors bam-megatron raises on purpose."""


class UserError(BamError):
    """Bad input: one line naming the file, flag, tensor or field at fault; the tools exit 2."""


class ConfigError(UserError):
    """Flags or model settings that do not fit together (sizes, parallel layout, ranges)."""


def run_tool(prog: str, body: Callable[[], Optional[int]], print_errors: Callable[[], bool] = lambda: True) -> int:
    """Run a tool's ``body`` and return its exit code: ``body()``'s (0 if None), 2 on a `UserError`.

    The error is printed as ``PROG: error: MESSAGE`` on stderr when ``print_errors()`` (multi-rank
    tools print from rank 0 only). Other exceptions are not caught: a traceback and exit 1.
    """
    try:
        return body() or 0
    except UserError as error:
        if print_errors():
            print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
