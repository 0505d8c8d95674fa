"""Shared behaviour of the entry points: user errors become one clear line and exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue

from lmkit.errors import DivergenceError

# Errors that mean "the input is wrong", not "lmkit is broken": shown as one line, no traceback.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    InstantiationException,
    DivergenceError,
    MissingMandatoryValue,
)


def error_message(err: BaseException) -> str:
    """The sentence to show for err: for Hydra's instantiate wrapper, the constructor's own."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        return str(err.__cause__).strip()
    if isinstance(err, MissingMandatoryValue):  # a `???` in the YAML the user did not give
        return f"{err.full_key}=... is required (see --help)"
    return str(err).strip()


def run_cli(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call fn; on a user error print `error: <message>` to stderr and exit with status 2.

    Set LMKIT_DEBUG=1 to see the full traceback instead.
    """
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as err:
        if os.environ.get("LMKIT_DEBUG"):
            raise
        print(f"error: {error_message(err)}", file=sys.stderr)
        sys.exit(2)
