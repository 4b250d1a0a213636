"""A model's name in an admin path (/admin/models/{model}/...).

Model names may hold "/" (ORG/NAME, the hub's grammar). A client sends it as %2F
(appliance/status.py: model_path), but the server decodes the path before routing,
so the name would span two segments and no route would match. For these paths the
path is routed as the client wrote it, with %2F kept encoded, and the handlers read
the name back whole (model_name)."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

PREFIX = "/admin/models/"


def routed_whole(scope: Any) -> Any:
    """scope, its path re-decoded from raw_path with %2F kept when it is an admin
    model path whose model name holds one; else scope as it came."""
    raw = scope.get("raw_path")
    if not scope["path"].startswith(PREFIX) or not raw or b"%2f" not in raw.lower():
        return scope
    kept = raw.decode("latin-1").replace("%2F", "%252F").replace("%2f", "%252F")
    return {**scope, "path": unquote(kept)}


def model_name(segment: str) -> str:
    """The model name a routed segment holds (a "%2F" in it is the name's "/")."""
    return unquote(segment)


__all__ = ["model_name", "routed_whole"]
