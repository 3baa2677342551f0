"""Limits and security, measured against a live ``cascade serve`` on loopback.

One server runs with short limits (``limits_client.Limits``) and three API keys: the
standard one ("default"), "capped" (few concurrent sessions) and "rated" (few connections
per window). Each limit row sends what breaks the limit, records the error code and close
code the client got, and checks that a neighbour session of another key, open all along,
still answers. The security rows try every endpoint that costs compute or reveals data
with wrong keys, resume a session with another key, let an ``ek_`` key expire, grep the
server's whole log for every key and token it saw, and measure the ids' entropy. One row
runs two more servers on one Redis, to hold a key's session cap across both.

The quick variant (CI, ``tests/benchmarks/reliability/test_limits.py``) and the full one
differ only in the process's session cap that is filled (8 or 32 sessions).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import inspect
import re
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import httpx
from websockets.exceptions import ConnectionClosed

from benchmarks.reliability.limits_client import (
    Conn,
    Limits,
    Server,
    handshake_status,
    limits_server,
    neighbour,
    refusal,
    session,
)
from benchmarks.reliability.rows import Row, Section
from orchestrator import limits as limits_mod
from orchestrator.protocol import base as protocol_base
from orchestrator.store import codec

COMMAND = "python -m benchmarks.reliability limits"
EK_SECONDS = 10  # the shortest lifetime a client secret may have


class Seen:
    """Every secret value the run handled, to look for in the server's log."""

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}  # value -> what it is
        self.ids: dict[str, list[str]] = {"session": [], "item": [], "resume_token": [],
                                          "ek": []}

    def created(self, event: dict[str, Any] | None) -> dict[str, Any]:
        assert event is not None and event.get("type") == "session.created", event
        sess: dict[str, Any] = event["session"]
        token = sess["cascade"]["resume_token"]
        self.secrets[token] = "resume token"
        self.ids["session"].append(sess["id"])
        self.ids["resume_token"].append(token)
        return sess


def row(section: Section, name: str, result: str, passed: bool, note: str = "",
        **figures: Any) -> Row:
    return Row(section=section, name=name, result=result, passed=passed, command=COMMAND,
               figures=figures, note=note)


async def _opened(server: Server, seen: Seen, key: str,
                  stack: contextlib.AsyncExitStack) -> Conn:
    """A session kept open (and talking, so never idle) until ``stack`` closes or the
    caller closes it."""
    conn = await stack.enter_async_context(session(server, key))
    seen.created(await conn.until("session.created", "error"))
    talking = asyncio.create_task(_keep_talking(conn))
    stack.push_async_callback(_stop, talking)
    return conn


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# --- limits ----------------------------------------------------------------------------------


async def message_size(server: Server, seen: Seen) -> Row:
    limit = server.limits.max_event_bytes
    async with neighbour(server) as other, session(server, server.keys["default"]) as conn:
        seen.created(await conn.until("session.created"))
        big = '{"type": "session.update", "session": {"instructions": "' + "x" * (2 * limit) \
            + '"}}'
        await conn.send(big)
        err = await conn.until("error")
        code = None if err is None else err["error"]["code"]
        goes_on = await conn.alive()
        fine = await other.unaffected()
    ok = code == "invalid_value" and goes_on and fine
    return row("limits", f"message size (max_event_bytes {limit})",
               f"sent a {len(big)}-byte event: error {code}, session went on: {goes_on}, "
               f"other session unaffected: {fine}", ok, sent_bytes=len(big), code=code)


async def audio_rate(server: Server, seen: Seen) -> Row:
    rate = server.limits.max_audio_rate
    chunk = base64.b64encode(bytes(24_000 * 2 // 5)).decode()  # 200 ms of silence, 24 kHz
    sent = 50  # 10 s of audio, as fast as the socket takes it
    async with neighbour(server) as other, session(server, server.keys["default"]) as conn:
        seen.created(await conn.until("session.created"))
        start = time.monotonic()
        for _ in range(sent):
            await conn.send({"type": "input_audio_buffer.append", "audio": chunk})
        elapsed = time.monotonic() - start
        # frames are handled in order: every append's answer comes before this one's
        await conn.send({"type": "session.update", "session": {"type": "realtime"}})
        refused = 0
        codes: set[str] = set()
        while (event := await conn.until("error", "session.updated")) is not None \
                and event["type"] == "error":
            refused += 1
            codes.add(event["error"]["code"])
        with_code = ",".join(sorted(codes)) or None
        goes_on = event is not None and await conn.alive()
        fine = await other.unaffected()
    accepted_ms = (sent - refused) * 200
    # the server lets 5 s in at once, then rate x the time it took to handle the burst
    ok = with_code == "audio_rate_exceeded" and 5000 <= accepted_ms < sent * 200 and \
        goes_on and fine
    return row("limits", f"input audio rate (max_audio_rate {rate:g}x real time)",
               f"sent {sent * 200} ms of audio in {elapsed:.2f} s: {refused} appends refused "
               f"with {with_code}, {accepted_ms} ms accepted (5 s at once, then {rate:g}x "
               f"real time), session went on: {goes_on}, other session unaffected: {fine}",
               ok, sent_ms=sent * 200, elapsed_s=round(elapsed, 3), refused=refused,
               accepted_ms=accepted_ms, code=with_code)


async def items(server: Server, seen: Seen) -> Row:
    limit = server.limits.max_items
    async with neighbour(server) as other, session(server, server.keys["default"]) as conn:
        seen.created(await conn.until("session.created"))
        for i in range(limit + 1):
            await conn.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": f"item {i}"}]}})
        added = 0
        code: str | None = None
        while code is None:
            event = await conn.until("conversation.item.added", "error", within=5.0)
            if event is None:
                break
            if event["type"] == "error":
                code = event["error"]["code"]
            else:
                added += 1
                seen.ids["item"].append(event["item"]["id"])
        goes_on = await conn.alive()
        fine = await other.unaffected()
    ok = code == "conversation_too_long" and added == limit and goes_on and fine
    return row("limits", f"conversation items (max_items {limit})",
               f"created {limit + 1} items: {added} added, the next refused with {code}, "
               f"session went on: {goes_on}, other session unaffected: {fine}", ok,
               added=added, code=code)


async def lifetime(server: Server, seen: Seen) -> Row:
    limit = server.limits.max_session_s
    async with session(server, server.keys["default"]) as conn:
        seen.created(await conn.until("session.created"))
        opened = time.monotonic()
        pinger = asyncio.create_task(_keep_talking(conn))  # not idle: only the lifetime
        await asyncio.sleep(limit / 2)
        async with neighbour(server) as other:
            err = await conn.until("error", within=limit + 5)
            close = await conn.closed()
            lived = (conn.closed_at or time.monotonic()) - opened
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
            fine = await other.unaffected()
    code = None if err is None else err["error"]["code"]
    ok = code == "session_expired" and close == 1000 and limit - 0.5 <= lived <= limit + 2 \
        and fine
    return row("limits", f"session lifetime (max_session_s {limit:g})",
               f"a session that kept talking: error {code} and close {close} after "
               f"{lived:.1f} s, other session unaffected: {fine}", ok,
               lived_s=round(lived, 2), code=code, close=close)


async def _keep_talking(conn: Conn) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.sleep(0.4)
            await conn.send({"type": "session.update", "session": {"type": "realtime"}})


async def idle(server: Server, seen: Seen) -> Row:
    limit = server.limits.max_idle_s
    async with neighbour(server) as other, session(server, server.keys["default"]) as conn:
        seen.created(await conn.until("session.created"))
        quiet_from = time.monotonic()
        err = await conn.until("error", within=limit + 5)
        close = await conn.closed()
        after = (conn.closed_at or time.monotonic()) - quiet_from
        fine = await other.unaffected()
    code = None if err is None else err["error"]["code"]
    ok = code == "session_idle_timeout" and close == 1000 and \
        limit - 0.2 <= after <= limit + 1.5 and fine
    return row("limits", f"idle session (max_idle_s {limit:g})",
               f"a session that sent nothing: error {code} and close {close} after "
               f"{after:.1f} s; a session talking every 0.4 s (as long) unaffected: {fine}",
               ok, idle_s=round(after, 2), code=code, close=close)


async def per_key_sessions(server: Server, seen: Seen) -> Row:
    cap = server.limits.capped_sessions
    key = server.keys["capped"]
    async with contextlib.AsyncExitStack() as stack:
        other = await stack.enter_async_context(neighbour(server))
        async with httpx.AsyncClient() as http:
            minted = await http.post(server.url + "/v1/realtime/client_secrets",
                                     headers={"Authorization": f"Bearer {key}"}, json={})
        ek = minted.json()["value"]
        seen.secrets[ek] = "ek_ key minted by capped"
        seen.ids["ek"].append(ek)
        held = [await _opened(server, seen, ek, stack)]  # counts against capped
        held += [await _opened(server, seen, key, stack) for _ in range(cap - 1)]
        code, close = await refusal(server, key)
        ek_code, _ = await refusal(server, ek)
        await held.pop().aclose()
        await asyncio.sleep(0.3)  # the server sees the close
        held.append(await _opened(server, seen, key, stack))
        fine = await other.unaffected() and all([await c.alive() for c in held])
    ok = code == ek_code == "key_session_limit_reached" and close == 1013 and fine
    return row("limits", f"concurrent sessions per API key (capped: {cap})",
               f"{cap} live (one with an ek_ key it minted), the next with the key and with "
               f"the ek_ key: error {code} / {ek_code}, close {close}; after one closed a new "
               f"one was let in; the other key's and the live sessions unaffected: {fine}",
               ok, code=code, close=close)


async def per_key_sessions_shared(limits: Limits, seen: Seen) -> Row:
    """The "capped" key's cap over two servers sharing one Redis (shared_caps.py)."""
    from benchmarks.reliability.fault_fleet import RedisProcess

    cap = limits.capped_sessions
    redis = RedisProcess()
    redis.start()
    try:
        with contextlib.ExitStack() as servers:
            a = servers.enter_context(limits_server(limits, redis_url=redis.url,
                                                    name="serve-limits-a"))
            b = servers.enter_context(limits_server(limits, keys=a.keys, redis_url=redis.url,
                                                    name="serve-limits-b"))
            key = a.keys["capped"]
            async with contextlib.AsyncExitStack() as stack:
                held = [await _opened(a, seen, key, stack)]
                held += [await _opened(b, seen, key, stack) for _ in range(cap - 1)]
                code_a, close_a = await refusal(a, key)
                code_b, _ = await refusal(b, key)
                await held.pop().aclose()  # one of b's closes: a place on either server
                let_in = False
                for _ in range(30):  # B's release reaches Redis in the background
                    await asyncio.sleep(0.1)
                    conn = await stack.enter_async_context(session(a, key))
                    event = await conn.until("session.created", "error")
                    seen.created(event)
                    if event is not None and event["type"] == "session.created":
                        stack.push_async_callback(_stop, asyncio.create_task(
                            _keep_talking(conn)))
                        held.append(conn)
                        let_in = True
                        break
                    await conn.aclose()
                alive = all([await c.alive() for c in held])
    finally:
        redis.close()
    ok = (code_a == code_b == "key_session_limit_reached" and close_a == 1013 and let_in
          and alive)
    return row("limits", f"concurrent sessions per API key over two servers sharing Redis "
               f"(capped: {cap})",
               f"{cap} live (1 on server A, {cap - 1} on B), the next on A and on B: error "
               f"{code_a} / {code_b}, close {close_a}; after one closed on B a new one was let "
               f"in on A: {let_in}; live sessions unaffected: {alive}", ok,
               code=code_a, close=close_a)


async def per_key_rate(server: Server, seen: Seen) -> Row:
    n, window = server.limits.rated_connections, server.limits.rated_window_s
    key = server.keys["rated"]
    async with neighbour(server) as other:
        for _ in range(n):
            async with session(server, key) as conn:
                seen.created(await conn.until("session.created"))
        code, close = await refusal(server, key)
        async with httpx.AsyncClient() as http:  # a WebRTC call: HTTP 429 + Retry-After
            r = await http.post(server.url + "/v1/realtime/calls", content=await _offer(),
                                headers={"Authorization": f"Bearer {key}",
                                         "Content-Type": "application/sdp"})
        http_code = r.json().get("error", {}).get("code")
        retry = r.headers.get("retry-after")
        fine = await other.unaffected()
    ok = code == http_code == "connection_rate_limited" and close == 1013 and \
        r.status_code == 429 and retry is not None and 1 <= int(retry) <= window and fine
    return row("limits", f"connection rate per API key (rated: {n} per {window:g} s)",
               f"{n} connections let in; the next WebSocket: error {code}, close {close}; a "
               f"WebRTC call: HTTP {r.status_code} {http_code}, Retry-After {retry} s; the "
               f"other key's session unaffected: {fine}", ok,
               code=code, close=close, http_status=r.status_code, retry_after=retry)


_OFFER: list[str] = []


async def _offer() -> str:
    """An SDP offer (made once: aiortc takes seconds to load on a busy machine)."""
    if _OFFER:
        return _OFFER[0]
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    sdp: str = pc.localDescription.sdp
    await pc.close()
    _OFFER.append(sdp)
    return sdp


async def process_sessions(server: Server, seen: Seen) -> Row:
    cap = server.limits.max_sessions
    key = server.keys["default"]
    async with contextlib.AsyncExitStack() as stack:
        held = [await _opened(server, seen, key, stack) for _ in range(cap)]
        code, close = await refusal(server, server.keys["capped"])  # any key: the cap
        fine = all([await c.alive() for c in held])
    ok = code == "session_limit_reached" and close == 1013 and fine
    return row("limits", f"sessions of the process (max_sessions {cap})",
               f"{cap} live sessions, the next: error {code}, close {close}; the {cap} live "
               f"ones unaffected: {fine}", ok, code=code, close=close)


# --- security --------------------------------------------------------------------------------


async def wrong_keys(server: Server, seen: Seen) -> Row:
    real = server.keys["default"]
    wrong = {"none": "", "wrong": "sk-" + "x" * (len(real) - 3),
             "one char off": real[:-1] + ("A" if real[-1] != "A" else "B"),
             "unknown ek_": "ek_" + "A" * 43}
    refused: list[str] = []
    let_in: list[str] = []
    async with httpx.AsyncClient(base_url=server.url) as http:
        for label, key in wrong.items():
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            for query in ("", "?call_id=rtc_0"):
                status = await handshake_status(server, key, query)
                (refused if status == 403 else let_in).append(
                    f"WS /v1/realtime{query} [{label}]: {status}")
            for path in ("/v1/realtime/calls", "/v1/realtime", "/v1/realtime/calls/rtc_0/hangup",
                         "/v1/realtime/client_secrets"):
                r = await http.post(path, headers=headers, content=b"{}")
                (refused if r.status_code == 401 and (not key or key not in r.text)
                 else let_in).append(f"POST {path} [{label}]: {r.status_code}")
    ok = not let_in and len(refused) == 4 * 6
    return row("security", "wrong keys refused on every endpoint that costs compute",
               f"{len(refused)}/{len(refused) + len(let_in)} refused (6 endpoints x no key, "
               "a wrong key, the key with one character changed, an unknown ek_ key): "
               "WebSocket 403, HTTP 401; no key echoed", ok,
               note="Open without a key: /healthz, /readyz (stage URLs and health), /metrics "
               "(counts only); the demo page's POST /demo/token mints ek_ keys for loopback "
               "clients with a loopback Host (CASCADE_DEMO, on by default; off in this run).",
               let_in=let_in)


def constant_time() -> Row:
    source = inspect.getsource(limits_mod.KeyRing)
    ring = limits_mod.KeyRing([("a", "k" * 20), ("b", "m" * 20), ("c", "n" * 20)])
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return bool(real(a, b))

    counts = []
    with mock.patch.object(hmac, "compare_digest", counting):
        for presented in (["k" * 20, "x"], ["x", "n" * 20], ["x", "y"]):
            calls.clear()
            ring.match(presented)
            counts.append(len(calls))
    uses = "hmac.compare_digest" in source and "break" not in source and \
        "return" not in source.split("for candidate", 1)[1].split("return found")[0]
    ok = uses and counts == [6, 6, 6]
    return row("security", "key comparison in constant time",
               f"hmac.compare_digest on every (presented, configured) pair, no early exit: "
               f"{counts} comparisons for a match first / last / none (3 keys x 2 presented)",
               ok, note="Checked in the code, not by timing (not measurable reliably here).",
               comparisons=counts)


async def resume_other_key(server: Server, seen: Seen) -> Row:
    owner = server.keys["default"]
    async with session(server, owner) as conn:
        sess = seen.created(await conn.until("session.created"))
    sid, token = sess["id"], sess["cascade"]["resume_token"]
    await asyncio.sleep(0.3)  # the lease is released
    answers = {}
    for label, key, tok in (("another key, right token", server.keys["capped"], token),
                            ("owner key, wrong token", owner, "A" * len(token)),
                            ("owner key, right token", owner, token)):
        async with session(server, key, f"?session_id={sid}&resume_token={tok}") as conn:
            first = await conn.until("session.created", "error")
            if first is not None and first["type"] == "error":
                answers[label] = (first["error"]["code"], first["error"]["message"],
                                  await conn.closed())
            else:
                answers[label] = ("resumed", "", None)
    stolen, wrong, right = answers.values()
    ok = stolen == wrong and stolen[0] == "invalid_resume_token" and stolen[2] == 1008 \
        and right[0] == "resumed"
    return row("security", "resume with another key refused",
               f"another key with the right token: {stolen[0]} (close {stolen[2]}), the same "
               f"answer as a wrong token: {stolen == wrong}; the owner's key resumed: "
               f"{right[0] == 'resumed'}", ok, answers={k: list(v) for k, v in answers.items()})


class Ephemeral:
    """An ek_ key minted at the start of the run, with a session config, checked at once
    and again once it has expired (the limit rows run in between)."""

    INSTRUCTIONS = "Answer in French."

    def __init__(self) -> None:
        self.value = ""
        self.expires_at = 0
        self.first: dict[str, Any] = {}

    async def mint(self, server: Server, seen: Seen) -> None:
        async with httpx.AsyncClient() as http:
            r = await http.post(server.url + "/v1/realtime/client_secrets", json={
                "expires_after": {"anchor": "created_at", "seconds": EK_SECONDS},
                "session": {"type": "realtime", "instructions": self.INSTRUCTIONS}},
                headers={"Authorization": f"Bearer {server.keys['default']}"})
            body = r.json()
            self.value, self.expires_at = body["value"], body["expires_at"]
            seen.secrets[self.value] = "ek_ key"
            seen.ids["ek"].append(self.value)
            minting = await http.post(server.url + "/v1/realtime/client_secrets", json={},
                                      headers={"Authorization": f"Bearer {self.value}"})
        async with session(server, self.value) as conn:
            sess = seen.created(await conn.until("session.created", "error"))
        sideband = await handshake_status(server, self.value, "?call_id=rtc_0")
        self.first = {"instructions": sess.get("instructions"), "mint": minting.status_code,
                      "sideband": sideband}

    async def check(self, server: Server) -> Row:
        wait = self.expires_at - time.time()
        if wait > 0:
            await asyncio.sleep(wait + 0.2)
        after = await handshake_status(server, self.value)
        ok = self.first == {"instructions": self.INSTRUCTIONS, "mint": 401,
                            "sideband": 403} and after == 403
        return row("security", f"ek_ key: scope and expiry ({EK_SECONDS} s)",
                   f"session started with the minted instructions: "
                   f"{self.first.get('instructions') == self.INSTRUCTIONS}; the ek_ key "
                   f"cannot mint (HTTP {self.first.get('mint')}) nor open a call's sideband "
                   f"({self.first.get('sideband')}); after expires_at: handshake {after}",
                   ok, note="Scope: the minted config is where the session starts; the "
                   "client may still session.update it (as with OpenAI).", **self.first,
                   after_expiry=after)


def keys_not_logged(server: Server, seen: Seen) -> Row:
    log = server.log()
    values = {**{k: f"API key {n}" for n, k in server.keys.items()}, **seen.secrets}
    leaked = sorted({what for value, what in values.items() if value in log})
    where = [line.replace(value, "<" + what + ">")[:200] for value, what in values.items()
             for line in log.splitlines() if value in line]
    lines = log.count("\n")
    return row("security", "keys and tokens never logged",
               f"{len(values)} secrets (3 API keys, ek_ keys, resume tokens) searched in the "
               f"server's whole log ({lines} lines, DEBUG level, after refusals, mints, resumes "
               f"and errors): {len(leaked)} found{': ' if leaked else ''}{', '.join(leaked)}",
               not leaked and lines > 0, leaked=leaked, where=where)


PREFIXES = {"session": "sess_", "item": "item_", "resume_token": "", "ek": "ek_"}


def _bits(values: list[str], prefix: str) -> float:
    """Entropy of the random part, from its alphabet (hex 4 bits/char, base64url 6)."""
    if not values or not all(v.startswith(prefix) for v in values):
        return 0.0
    tails = [v[len(prefix):] for v in values]
    hexy = all(re.fullmatch(r"[0-9a-f]+", t) for t in tails)
    shortest = min(len(t) for t in tails)
    return shortest * 4 if hexy else shortest * 6 // 8 * 8  # base64: whole bytes encoded


def ids_entropy(seen: Seen) -> Row:
    generators: dict[str, Callable[..., str]] = {
        "session id": codec.new_session_id, "resume token": codec.new_resume_token,
        "item/response id": protocol_base.new_id}
    from_secrets = all("secrets." in inspect.getsource(f) for f in generators.values())
    bits = {name: round(_bits(values, PREFIXES[name])) for name, values in seen.ids.items()}
    unique = all(len(set(v)) == len(v) for v in seen.ids.values())
    ok = from_secrets and unique and bits["resume_token"] >= 128 and bits["ek"] >= 128 \
        and bits["session"] >= 64 and bits["item"] >= 64
    return row("security", "ids and tokens unguessable",
               "from the secrets module; random bits: " + ", ".join(
                   f"{name} {b}" for name, b in bits.items()) +
               f" ({sum(map(len, seen.ids.values()))} seen, all distinct: {unique})", ok,
               note="Tokens must carry >= 128 random bits, ids >= 64.", bits=bits)


async def cors(server: Server) -> Row:
    foreign = "https://attacker.example"
    async with httpx.AsyncClient(base_url=server.url) as http:
        headers = []
        for path in ("/v1/realtime/calls", "/v1/realtime/client_secrets"):
            pre = await http.options(path, headers={
                "Origin": foreign, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"})
            post = await http.post(path, headers={"Origin": foreign})
            headers += [pre.headers.get("access-control-allow-origin"),
                        post.headers.get("access-control-allow-origin")]
    # A browser on another site can open a WebSocket (no CORS there): only a key it holds
    # gets it in (the subprotocol), as no cookie or ambient credential is ever accepted.
    keyless = await handshake_status(server, "")
    ok = headers == [None] * 4 and keyless == 403
    return row("security", "CORS off by default; cross-site WebSocket needs the key",
               f"no Access-Control-Allow-Origin for {foreign} on 4 requests (preflight and "
               f"POST, calls and client_secrets): {headers == [None] * 4}; a WebSocket "
               f"handshake without the key: {keyless}", ok,
               note="Auth never uses cookies, so a cross-site page gets in only with a key "
               "it holds (the openai-insecure-api-key subprotocol, i.e. an ek_ key).")


# --- the run ---------------------------------------------------------------------------------


async def run(quick: bool) -> list[Row]:
    limits = Limits(max_sessions=8 if quick else 32)
    seen = Seen()
    rows: list[Row] = []
    await _offer()
    with limits_server(limits) as server:
        ek = Ephemeral()
        await ek.mint(server, seen)
        for check in (message_size, audio_rate, items, idle, per_key_sessions, per_key_rate,
                      process_sessions, lifetime):
            started = time.monotonic()
            try:
                rows.append(await check(server, seen))
            except Exception as exc:  # a broken check is a failed row, not a lost run
                rows.append(row("limits", check.__name__.replace("_", " "),
                                f"the check failed: {type(exc).__name__}: {exc}", False))
            rows[-1].figures["seconds"] = round(time.monotonic() - started, 2)
        for sec in (wrong_keys, resume_other_key):
            try:
                rows.append(await sec(server, seen))
            except Exception as exc:
                rows.append(row("security", sec.__name__.replace("_", " "),
                                f"the check failed: {type(exc).__name__}: {exc}", False))
        rows.append(await ek.check(server))
        try:
            rows.append(await per_key_sessions_shared(limits, seen))
        except Exception as exc:
            rows.append(row("limits", "concurrent sessions per API key over two servers",
                            f"the check failed: {type(exc).__name__}: {exc}", False))
        rows.append(await cors(server))
        rows.append(constant_time())
        rows.append(ids_entropy(seen))
        rows.append(keys_not_logged(server, seen))
    return rows
