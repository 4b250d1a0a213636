"""[telemetry]: the OTLP traces exporter's settings and their checks."""

from __future__ import annotations

import re

import msgspec

from appliance.config.sections import _Section


class TelemetryConfig(_Section):
    # Traces of proxied requests (OpenTelemetry, OTLP/HTTP; appliance/gateway/tracing.py).
    # Empty: off, nothing is sent anywhere. Else the collector's OTLP/HTTP URL, e.g.
    # "http://127.0.0.1:4318" (/v1/traces is added when the URL has no path). Needs the
    # OpenTelemetry packages (the "telemetry" extra; install.sh installs them).
    otlp_endpoint: str = ""
    service_name: str = "appliance"
    # The share of new traces recorded (0-1); a client's traceparent decides for its own.
    sample_ratio: float = 1.0
    # Sent with every export (a collector's tenant or token); never sent to engines.
    headers: dict[str, str] = msgspec.field(default_factory=dict)


def traces_url(t: TelemetryConfig) -> str:
    """The OTLP/HTTP traces URL: the endpoint, /v1/traces added when it names no path."""
    from urllib.parse import urlsplit

    if urlsplit(t.otlp_endpoint).path in ("", "/"):
        return t.otlp_endpoint.rstrip("/") + "/v1/traces"
    return t.otlp_endpoint


# The packages [telemetry] needs, looked for (never imported) when an endpoint is set.
TELEMETRY_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")


def _validate_telemetry(t: TelemetryConfig, need) -> None:
    """[telemetry]: an http(s) URL with a host, a printable service name, a ratio
    within 0-1, header names and values that cannot split a request, the packages."""
    from importlib.util import find_spec
    from urllib.parse import urlsplit

    need(0.0 <= t.sample_ratio <= 1.0, "telemetry.sample_ratio", f"must be within 0-1, got {t.sample_ratio}")
    need(
        0 < len(t.service_name) <= 128 and t.service_name.isprintable(),
        "telemetry.service_name",
        "must be 1-128 printable characters",
    )
    for name, value in t.headers.items():
        need(bool(_HEADER_NAME_RE.match(name)), f"telemetry.headers.{name}", "is not a valid HTTP header name")
        need(value.isprintable(), f"telemetry.headers.{name}", "must be printable (no line breaks)")
    if not t.otlp_endpoint:
        return
    try:
        url = urlsplit(t.otlp_endpoint)
        _ = url.port  # a port that is not a number raises here
        ok = url.scheme in ("http", "https") and bool(url.hostname) and not (url.query or url.fragment)
        # urlsplit drops tabs and line breaks: the URL as written must have none.
        ok = ok and t.otlp_endpoint.isprintable()
    except ValueError:
        ok = False
    # A credential in the URL (user:pw@, or :pw@ with no user) would be logged wherever
    # the URL is: it goes in telemetry.headers, and is never echoed back.
    credential = "@" in url.netloc if ok else "@" in t.otlp_endpoint
    shown = "the URL (it holds a credential)" if credential else repr(t.otlp_endpoint)
    need(
        ok and not credential,
        "telemetry.otlp_endpoint",
        f'{shown} is not an http(s) URL of an OTLP/HTTP collector, e.g. "http://127.0.0.1:4318"'
        + ("; send a collector's credential as telemetry.headers (e.g. Authorization)" if credential else ""),
    )
    try:
        missing = [m for m in TELEMETRY_MODULES if find_spec(m) is None]
    except ImportError:  # a parent package missing
        missing = list(TELEMETRY_MODULES)
    need(
        not missing,
        "telemetry.otlp_endpoint",
        "traces need the OpenTelemetry packages, not installed here: pip install 'appliance[telemetry]' "
        "(opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http; install.sh and the offline bundle carry "
        "them), or leave otlp_endpoint empty",
    )
