"""The one exception base for what the user must fix, and how every script reports it.

It lives in the torch-free `datatools` package so that the data tools and the model scripts share it.
"""

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Something the user must fix (a path, a value, a file); printed as one line without a traceback.

    `exit_code` is 2 for bad input and 1 where a run stopped on bad data.
    """

    exit_code = 2


class DataStopError(UserError):
    """A run stopped because too much of its data was bad."""

    exit_code = 1


def report_user_errors(run: Callable[[], T]) -> T:
    """Call `run()`; a `UserError` becomes "error: ..." on stderr and its exit code.

    Anything else is a bug and keeps its traceback.
    """
    try:
        return run()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
