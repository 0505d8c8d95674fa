"""Shared behaviour of the entry points: user errors become one clear line and exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from lmkit.errors import DivergenceError, MissingExtraError

# Errors that mean "the input is wrong", not "lmkit is broken": shown as one line, no traceback.
USER_ERRORS = (
    ValueError,
    ConnectionError,  # a push to the Hub that cannot reach it
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    InstantiationException,  # also Lightning's verdict on a trainer flag, at construction
    DivergenceError,
    MissingExtraError,  # pip install -e ".[extra]"
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


class OutputDirCheck(Callback):
    """Before Hydra creates the run dir (or a sweep's dir): a path that exists as a file is
    refused with one line, instead of Hydra's own traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_output_dir(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_output_dir(config.hydra.sweep.dir, "hydra.sweep.dir")


def check_output_dir(path: str, key: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        print(f"error: {key}={path} is a file, not a folder; give a folder path", file=sys.stderr)
        sys.exit(2)
