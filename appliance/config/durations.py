"""Durations as the operator writes them ("90s", "5m", "1h"), parsed once at load."""

from __future__ import annotations


def parse_duration(text: str | float | int, field_name: str = "duration") -> float:
    """'90s', '5m', '1h', '0' or a number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().lower()
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    for unit in ("ms", "s", "m", "h", "d"):
        if s.endswith(unit) and s[: -len(unit)].replace(".", "", 1).isdigit():
            return float(s[: -len(unit)]) * units[unit]
    if s.replace(".", "", 1).isdigit():
        return float(s)
    raise ValueError(f"{field_name}: {text!r} is not a duration (e.g. 90s, 5m, 1h, 0)")


class Duration:
    """A length of time as the operator wrote it ("90s", "5m", "1h", "0s"; "" = not set) and
    in seconds, parsed once when the config is loaded."""

    __slots__ = ("seconds", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.seconds = parse_duration(text) if text else 0.0

    def __bool__(self) -> bool:
        return bool(self.text)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Duration({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Duration) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def _decode_duration(type_: type, value: object) -> object:
    """msgspec's hook for Duration fields: a TOML string, parsed here, at load."""
    if type_ is not Duration:
        raise NotImplementedError(type_)
    if not isinstance(value, str):
        raise TypeError(f"Expected `str`, got `{type(value).__name__}`")
    try:
        return Duration(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a duration (e.g. 90s, 5m, 1h, 0s)") from None
