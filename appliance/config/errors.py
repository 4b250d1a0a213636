"""The config's errors, phrased for the operator: the file, the field as written in TOML, the fix."""

from __future__ import annotations

import difflib
import re

import msgspec
import msgspec.inspect


class ConfigError(Exception):
    """A config problem, phrased for the operator: file, field, what is wrong."""


def decode_error_message(exc: msgspec.ValidationError, root: type, raw: str) -> str:
    """A value the schema refuses, as the operator finds and fixes it: its line in the file
    (when it is written on one) and the field as written in TOML; a typo'd key also gets the
    known key closest to it."""
    return unknown_key_message(exc, root, raw) or _field_message(exc, raw)


def _field_message(exc: msgspec.ValidationError, raw: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.server.port`"; turn the
    # JSON path into the TOML field the operator edits: server.port, models[0].name.
    text = str(exc)
    match = re.search(r" - at `\$(.*)`$", text)
    if not match:
        return text
    field = match.group(1).lstrip(".")
    message = text[: match.start()]
    line = _key_line(raw, field)
    return f"{f'line {line}: ' if line else ''}field '{field}': {message}"


_UNKNOWN_KEY = re.compile(r"^Object contains unknown field `(.+)`$")
# Fields of Config that the loader fills, never a TOML key: never suggested.
NOT_KEYS = {"origin", "deprecations"}


def unknown_key_message(exc: msgspec.ValidationError, root: type, raw: str) -> str | None:
    """A typo'd key as the operator fixes it: its line in the file, the key in full, and the
    known key it is closest to (`line 3: field 'server.log_levl' is unknown; did you mean
    'server.log_level'?`); None for any other error."""
    text = str(exc)
    match = re.search(r" - at `\$(.*)`$", text)
    unknown = _UNKNOWN_KEY.match(text[: match.start()] if match else text)
    if not unknown:
        return None
    table, key = (match.group(1).lstrip(".") if match else ""), unknown.group(1)
    full = f"{table}.{key}" if table else key
    close = difflib.get_close_matches(key, _known_keys(root, table), n=1, cutoff=0.6)
    line = _key_line(raw, full)
    hint = f"; did you mean '{table + '.' if table else ''}{close[0]}'?" if close else ""
    return f"{f'line {line}: ' if line else ''}field '{full}' is unknown{hint} (appliance.example.toml lists every key)"


def _known_keys(root: type, table: str) -> list[str]:
    """The keys the table at `table` (server, models[0].autoscaling) may hold."""
    info = _struct(msgspec.inspect.type_info(root))
    for part in filter(None, table.split(".")):
        name = part.split("[")[0]
        field = next((f for f in info.fields if f.encode_name == name), None) if info else None
        if field is None:
            return []
        inner = field.type
        if "[" in part and isinstance(inner, msgspec.inspect.ListType):
            inner = inner.item_type
        info = _struct(inner)
    return [f.encode_name for f in info.fields if f.encode_name not in NOT_KEYS] if info else []


def _struct(info: msgspec.inspect.Type) -> msgspec.inspect.StructType | None:
    if isinstance(info, msgspec.inspect.UnionType):
        info = next((t for t in info.types if isinstance(t, msgspec.inspect.StructType)), info)
    return info if isinstance(info, msgspec.inspect.StructType) else None


def _key_line(raw: str, full: str) -> int | None:
    """The line that sets `full` (server.log_levl, models[1].sourc), following [tables] and
    [[arrays of tables]]; None when it is set some other way (an inline table)."""
    table = ""
    arrays: dict[str, int] = {}  # an array of tables' path -> the index of its last table
    for number, line in enumerate(raw.splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if header := re.fullmatch(r"\[\[(.+)\]\]", text):
            *parent, last = _dotted(header.group(1))
            base = ".".join(filter(None, [_resolve(parent, arrays), last]))
            arrays[base] = arrays.get(base, -1) + 1
            table = f"{base}[{arrays[base]}]"
            if _sets(table, full):
                return number
        elif header := re.fullmatch(r"\[(.+)\]", text):
            table = _resolve(_dotted(header.group(1)), arrays)
            if _sets(table, full):
                return number
        elif assignment := re.match(r"([A-Za-z0-9_\-.\"' ]+?)\s*=", text):
            key = ".".join(_dotted(assignment.group(1)))
            if _sets(f"{table}.{key}" if table else key, full):
                return number
    return None


def _sets(path: str, full: str) -> bool:
    """Whether a header or key at `path` is where `full` is first written (a [typo'd] table
    is its own header's line; servr.port = 1 is servr's)."""
    return path == full or path.startswith(f"{full}.") or path.startswith(f"{full}[")


def _dotted(name: str) -> list[str]:
    return [part.strip().strip("\"'") for part in name.split(".")]


def _resolve(parts: list[str], arrays: dict[str, int]) -> str:
    """A table's path with the index of each array of tables it is under: models[0].autoscaling."""
    path = ""
    for part in parts:
        path = f"{path}.{part}" if path else part
        if path in arrays:
            path = f"{path}[{arrays[path]}]"
    return path
