"""The browser demo page of ``cascade serve``: ``GET /``, its static assets under
``/web/``, and ``POST /demo/token``, which gives the page a short-lived ``ek_`` key.

Why it is built this way:

* The page follows the pattern OpenAI documents for browsers: a backend that holds the
  real key mints ephemeral keys, and the page only ever sees those. Here the server is its
  own backend, so the token endpoint mints directly with ``ClientSecrets`` and the
  server's standard API key never reaches the page.
* Anyone who can call the token endpoint can talk to the agent, so by default it answers
  only clients on this machine: the peer address (``request.client.host``, never a
  forwarded-for header we would have to trust) must be loopback, and the ``Host`` header
  must name a loopback host too, which stops a DNS-rebinding page (an attacker's name
  that resolves to 127.0.0.1) from minting keys through the user's own browser. A request
  that carries a reverse proxy's headers (``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``...)
  is refused as well: a proxy on the same machine makes every visitor's request look local
  (nginx even sends ``Host: 127.0.0.1:<port>`` by default), and no browser talking to the
  server directly sends them.
  ``CASCADE_DEMO_PUBLIC=true`` lifts both for a deliberate public demo. In every mode a
  browser request from another site (``Sec-Fetch-Site``/``Origin``) is refused, so
  permissive CORS settings cannot turn the endpoint into a key dispenser for other pages.
* The assets are a handful of small files read once when the router is built, served
  with an ``ETag`` and ``Cache-Control: no-cache``: browsers revalidate (a cheap 304) and
  always run the page that matches the server they talk to after an upgrade.
* ``CASCADE_DEMO=false`` leaves every route out, so ``/``, the assets and the token
  endpoint are plain 404s.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from orchestrator.settings import ServeSettings
from orchestrator.store import StoreError, StoreLimitError

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
ASSET_PREFIX = "/web/"
TOKEN_PATH = "/demo/token"
TOKEN_SECONDS = 600

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

# The session every demo key carries (the page sends the same in session.update): server
# VAD turns that the user can talk over, and cascade's per-turn stage timings for the
# latency panel.
DEMO_SESSION: dict[str, Any] = {
    "type": "realtime",
    "audio": {"input": {"turn_detection": {"type": "server_vad", "create_response": True,
                                           "interrupt_response": True}}},
    "cascade": {"timings": True},
}

# Same-origin scripts and styles only; media from the peer connection; fetches to this
# server. Nothing on the page is inline, so nothing needs 'unsafe-inline'.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "media-src 'self' blob: mediastream:; connect-src 'self'; object-src 'none'; "
        "base-uri 'self'; frame-ancestors 'none'; form-action 'none'"
    ),
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
# Headers a reverse proxy adds (lowercase, as starlette's Headers compares them).
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
                 "x-real-ip", "via")
NOT_PUBLIC_HINT = ("Set CASCADE_DEMO_PUBLIC=true to let other machines use the demo page; "
                   "anyone who can reach the server can then talk to the agent.")


class MintedSecret(Protocol):
    """What the page needs of a minted key (``orchestrator.keys.ClientSecret``)."""

    @property
    def value(self) -> str: ...

    @property
    def expires_at(self) -> int: ...


class SecretMinter(Protocol):
    """What the token endpoint needs of ``orchestrator.keys.ClientSecrets``."""

    async def mint(self, *, seconds: int = ...,
                   session: dict[str, Any] | None = ...) -> MintedSecret: ...


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets(directory: Path = WEB_DIR) -> dict[str, Asset]:
    """Every servable file of the page by name (flat folder, known types only)."""
    assets: dict[str, Asset] = {}
    for path in sorted(directory.iterdir()):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        digest = hashlib.sha256(body).hexdigest()[:20]
        assets[path.name] = Asset(body, content_type, f'"{digest}"')
    if "index.html" not in assets:
        raise FileNotFoundError(f"the demo page is missing: {directory / 'index.html'}")
    return assets


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-style error body, as the rest of the API answers."""
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code,
                      "param": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def _serve(asset: Asset, request: Request) -> Response:
    headers = {"ETag": asset.etag, "Cache-Control": "no-cache", **PAGE_HEADERS}
    if asset.etag in _etags(request.headers.get("if-none-match", "")):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.content_type, headers=headers)


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def is_loopback_address(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for names and junk."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_loopback_host(host_header: str) -> bool:
    """The ``Host`` header names this machine: ``localhost`` (or a ``.localhost`` name,
    which browsers resolve to loopback themselves) or a loopback address."""
    hostname = urlsplit(f"//{host_header}").hostname or ""
    return hostname in ("localhost",) or hostname.endswith(".localhost") or (
        is_loopback_address(hostname))


def cross_site_refusal(request: Request) -> str | None:
    """Why a browser request from another site is refused, or None. ``Sec-Fetch-Site``
    is set by every current browser and cannot be forged by a page; older ones fall back
    to comparing ``Origin`` with ``Host``. Non-browser clients send neither."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        if site in ("same-origin", "none"):
            return None
        return f"a page from another site may not get demo keys (Sec-Fetch-Site: {site})"
    origin = request.headers.get("origin")
    if origin is None:
        return None
    if origin != "null" and urlsplit(origin).netloc == request.headers.get("host", ""):
        return None
    return f"a page from another origin may not get demo keys (Origin: {origin})"


def token_refusal(request: Request, public: bool) -> JSONResponse | None:
    """The 403 for a caller the token endpoint does not serve, or None."""
    reason = cross_site_refusal(request)
    if reason is not None:
        return error_response(403, "cross_origin_forbidden", reason)
    if public:
        return None
    peer = request.client.host if request.client is not None else None
    if not is_loopback_address(peer):
        return error_response(
            403, "demo_not_public",
            f"The demo token endpoint answers clients on this machine only (loopback); "
            f"this request came from {peer or 'an unknown address'}. {NOT_PUBLIC_HINT}")
    proxied = [name for name in PROXY_HEADERS if name in request.headers]
    if proxied:
        return error_response(
            403, "demo_not_public",
            f"The demo token endpoint answers clients on this machine only, and this request "
            f"came through a proxy ({', '.join(proxied)}): behind a reverse proxy every "
            f"visitor looks local. {NOT_PUBLIC_HINT}")
    host = request.headers.get("host", "")
    if not is_loopback_host(host):
        return error_response(
            403, "demo_not_public",
            f"The demo token endpoint answers pages opened as http://localhost:<port>/ or "
            f"http://127.0.0.1:<port>/ only (this one was opened as {host or 'no host'}). "
            f"{NOT_PUBLIC_HINT}")
    return None


def router(settings: ServeSettings,
           secrets: Callable[[], SecretMinter | None]) -> APIRouter:
    """The demo's routes; empty when ``settings.demo`` is off. ``secrets`` is called per
    request because the key store is loaded in the background after startup."""
    api = APIRouter(include_in_schema=False)
    if not settings.demo:
        return api
    assets = load_assets()
    index = assets["index.html"]

    @api.api_route("/", methods=["GET", "HEAD"])
    async def page(request: Request) -> Response:
        return _serve(index, request)

    @api.api_route(ASSET_PREFIX + "{name}", methods=["GET", "HEAD"])
    async def asset(name: str, request: Request) -> Response:
        found = assets.get(name)
        if found is None or name == "index.html":
            return error_response(404, "not_found", f"no such file: {ASSET_PREFIX}{name}")
        return _serve(found, request)

    @api.post(TOKEN_PATH)
    async def token(request: Request) -> Response:
        refused = token_refusal(request, settings.demo_public)
        if refused is not None:
            return refused
        minter = secrets()
        if minter is None:
            return error_response(503, "not_ready", "the server is still loading; try again "
                                  "in a few seconds", headers={"Retry-After": "2"})
        try:
            secret = await minter.mint(seconds=TOKEN_SECONDS, session=DEMO_SESSION)
        except StoreLimitError as exc:
            return error_response(429, exc.code, f"too many live keys: {exc}",
                                  headers={"Retry-After": "10"})
        except StoreError as exc:
            log.warning("demo token: minting failed: %r", exc)
            return error_response(503, exc.code, f"could not mint a key: {exc}",
                                  headers={"Retry-After": "2"})
        return JSONResponse({"value": secret.value, "expires_at": secret.expires_at},
                            headers={"Cache-Control": "no-store"})

    return api
