"""The config's errors, phrased for the operator: the file, the field as written in TOML, the fix."""

from __future__ import annotations

import re

import msgspec


class ConfigError(Exception):
    """A config problem, phrased for the operator: file, field, what is wrong."""


def _field_message(exc: msgspec.ValidationError) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.server.port`"; turn the
    # JSON path into the TOML field the operator edits: server.port, models[0].name.
    text = str(exc)
    match = re.search(r" - at `\$(.*)`$", text)
    if not match:
        return text
    field = match.group(1).lstrip(".")
    message = text[: match.start()]
    return f"field '{field}': {message}"
