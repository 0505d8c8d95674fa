"""Shared behaviour of the entry points: user errors become one clear line and exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException
from omegaconf import DictConfig

from lmkit.callbacks import DivergenceError

# Errors that mean "the input is wrong", not "lmkit is broken": shown as one line, no traceback.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    InstantiationException,
    DivergenceError,
)


def error_message(err: BaseException) -> str:
    """The sentence to show for err: for Hydra's instantiate wrapper, the constructor's own."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        return str(err.__cause__).strip()
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


def parse_key_values(defaults: dict, doc: str, argv: list[str] | None = None) -> DictConfig:
    """key=value arguments over `defaults`; `-h`/`--help` prints `doc` and exits.

    Values of keys whose default is a string are taken verbatim (a prompt like `ROMEO:` stays
    text); others are parsed as YAML (`top_k=null`, `max_new_tokens=50`). An unknown key or a
    missing required (`???`) value is a one-line error with exit status 2.
    """
    import yaml
    from omegaconf import OmegaConf

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip())
        sys.exit(0)
    values = dict(defaults)
    try:
        for arg in argv:
            key, sep, raw = arg.partition("=")
            if not sep:
                raise ValueError(f"arguments are key=value pairs, got {arg!r}")
            if key not in defaults:
                raise ValueError(f"unknown key {key!r}; known keys: {', '.join(defaults)}")
            values[key] = raw if isinstance(defaults[key], str) else yaml.safe_load(raw)
        missing = [k for k, v in values.items() if v == "???"]
        if missing:
            raise ValueError(f"{missing[0]}=... is required (see --help)")
    except (ValueError, yaml.YAMLError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    return OmegaConf.create(values)
