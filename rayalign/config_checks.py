"""Configuration errors and the small validators every config section uses.

Kept apart from the schema so that the section modules (`rayalign.config`, `rayalign.config_loop`)
share one error type and one wording for invalid values.
"""

from __future__ import annotations

import difflib
from typing import Any


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the dotted key."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: Any, key: str, choices: tuple) -> None:
    if value in choices:
        return
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}; got {value!r}{hint}")


def _positive(value: float, key: str) -> None:
    _require(value > 0, key, f"must be > 0; got {value!r}")
