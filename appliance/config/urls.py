"""The one form a media URL is compared in ([server] media_url_prefixes): the
config checks each prefix is written in it, and the front door
(appliance/gateway/media_urls.py) puts each URL a request names in it before it
compares, so two spellings of one place compare equal and a look-alike never does.
"""

from __future__ import annotations

from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Percent-encoded '.', '/' and '\\': a path that fetches elsewhere than it reads.
_ENCODED_SEPARATORS = ("%2e", "%2f", "%5c")


def normal_url(url: str) -> str | None:
    """url as ``scheme://host[:port]/path[?query]``: scheme and host lower-case, the
    scheme's default port left out, the fragment dropped (no fetcher sends it). None
    for what is no plain absolute http(s) URL: userinfo (``http://good@evil/``),
    backslashes, spaces or control characters, non-ASCII, percent-encoded dots or
    slashes, ``.`` or ``..`` segments, a bad port."""
    if not url.isascii() or any(c <= " " or c in "\\\x7f" for c in url):
        return None
    if any(e in url.lower() for e in _ENCODED_SEPARATORS):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host or "@" in parts.netloc:
        return None
    path = parts.path or "/"
    if not path.startswith("/") or any(s in (".", "..") for s in path.split("/")):
        return None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    return f"{scheme}://{netloc}{path}" + (f"?{parts.query}" if parts.query else "")


def prefix_error(prefix: str) -> str | None:
    """Why prefix cannot be a media URL prefix, if it cannot."""
    normal = normal_url(prefix)
    if normal is None:
        return (
            f"{prefix!r} is not an absolute http(s) URL prefix without userinfo, backslashes, "
            "spaces, percent-encoded dots or slashes and dot segments"
        )
    if "?" in normal or not normal.endswith("/"):
        return f"{prefix!r} must end in '/' (a whole path segment: 'http://images.internal/cat/'), with no query"
    if normal != prefix:
        return f"{prefix!r} must be written in its normal form: {normal!r}"
    return None


__all__ = ["normal_url", "prefix_error"]
