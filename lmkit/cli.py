"""Shared behaviour of the entry points: user errors become one clear line and exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException

# Errors that mean "the input is wrong", not "lmkit is broken": shown as one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, InstantiationException)


def run_cli(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call fn; on a user error print `error: <message>` to stderr and exit with status 2.

    Set LMKIT_DEBUG=1 to see the full traceback instead.
    """
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as err:
        if os.environ.get("LMKIT_DEBUG"):
            raise
        message = str(err).strip()
        if isinstance(err, InstantiationException) and err.__cause__ is not None:
            message = str(err.__cause__).strip()  # the constructor's own sentence
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_key_values(defaults: dict, doc: str, argv: list[str] | None = None):
    """key=value arguments over `defaults` (an unknown key or a missing `???` value is an error).

    `-h`/`--help` prints `doc` and exits.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip())
        sys.exit(0)
    base = OmegaConf.create(defaults)
    OmegaConf.set_struct(base, True)
    try:
        bad = [a for a in argv if "=" not in a]
        if bad:
            raise ValueError(f"arguments are key=value pairs, got {bad[0]!r}")
        args = OmegaConf.merge(base, OmegaConf.from_dotlist(argv))
        missing = [k for k in args if OmegaConf.is_missing(args, k)]
        if missing:
            raise ValueError(f"{missing[0]}=... is required (see --help)")
    except (ValueError, OmegaConfBaseException) as err:
        message = str(err).splitlines()[0]
        if "Key '" in message and "not in struct" in message.lower() or "not found" in message:
            message += f"; known keys: {', '.join(defaults)}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    return args
