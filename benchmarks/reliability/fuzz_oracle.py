"""What counts as a crash while fuzzing, and the tally of one target.

A crash is anything a correct server never does with bad input: the process dies, a
traceback reaches its log, an ``error`` event says the server failed
(``server_error``) or is malformed, a connection drops without a close frame (or
closes with 1011), a request gets a 5xx, a frame goes unanswered, or a session stops
answering. A clean close with a documented code is a valid answer.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from orchestrator.launcher import CascadeProcess

# Close codes a server may answer bad input with (RFC 6455 / the services' docs).
CLEAN_CLOSES = frozenset({1000, 1008, 1009, 1012, 1013})
# Error codes that mean "your event is malformed": never the answer to a valid event.
PARSE_CODES = frozenset({"invalid_json", "invalid_type", "missing_required_parameter",
                         "unknown_parameter", "invalid_audio"})
SHOWN = 160  # characters of an offending input kept in a finding


def short(data: object) -> str:
    text = repr(data)
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} chars)"


@dataclass
class Tally:
    """What one target received and how it answered."""

    target: str
    asked: int = 0  # inputs it was to receive (a short run fails its row)
    events: int = 0
    errors: int = 0  # inputs answered by an error event / a 4xx
    clean_closes: int = 0
    crashes: list[str] = field(default_factory=list)

    def crash(self, what: str, data: object) -> None:
        self.crashes.append(f"{what}: {short(data)}")

    def figures(self) -> dict[str, Any]:
        return {"asked": self.asked, "events": self.events, "crashes": len(self.crashes),
                "errors": self.errors,
                "clean_closes": self.clean_closes, "first_crashes": self.crashes[:5]}


def bad_error(event: dict[str, Any]) -> str | None:
    """Why an ``error`` event is not a proper one (None: it is)."""
    err = event.get("error", event)  # Realtime: nested; the stages' streams: flat
    if not isinstance(err, dict):
        return "error event without an error object"
    for key in ("type", "code", "message") if err is not event else ("code", "message"):
        if not isinstance(err.get(key), str) or not err.get(key):
            return f"error event without {key}"
    if err.get("code") == "server_error":
        return f"server failed: {err.get('message')}"
    return None


def bad_http(status: int, body: bytes, allowed: Iterable[int]) -> str | None:
    """Why an HTTP answer to fuzzed input is wrong (None: it is fine)."""
    if status >= 500 or status not in allowed:
        return f"HTTP {status} {body[:120]!r}"
    if 400 <= status < 500 and status not in (404, 405):
        try:
            err = json.loads(body).get("error")
        except (ValueError, AttributeError):
            return f"HTTP {status} without a JSON error body: {body[:120]!r}"
        if not isinstance(err, dict) or not isinstance(err.get("message"), str):
            return f"HTTP {status} error body without error.message: {body[:120]!r}"
    return None


TRACE_MARKS = ("Traceback (most recent call last)", "Exception in ASGI application")


def log_crashes(proc: CascadeProcess) -> list[str]:
    """Tracebacks in a process's log (each one's last line)."""
    lines = proc.log_tail(10**9).splitlines()
    found = []
    for i, line in enumerate(lines):
        if any(mark in line for mark in TRACE_MARKS):
            tail = next((lines[j] for j in range(i + 1, min(i + 200, len(lines)))
                         if lines[j] and not lines[j].startswith((" ", "Traceback"))), "")
            found.append(f"{proc.name} log: {line.strip()[:60]} -> {tail[:200]}")
    return found


async def alive(proc: CascadeProcess) -> str | None:
    """None when the process runs and its /healthz answers 200."""
    if proc.proc.poll() is not None:
        return f"{proc.name} exited with {proc.proc.returncode}"
    with contextlib.suppress(httpx.HTTPError):
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(f"{proc.url}/healthz")
            if r.status_code == 200:
                return None
            return f"{proc.name} /healthz {r.status_code}"
    return f"{proc.name} /healthz did not answer"
