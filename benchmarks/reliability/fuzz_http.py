"""Fuzzing the orchestrator's HTTP APIs: ``POST /v1/realtime/client_secrets``, WebRTC
offers (``POST /v1/realtime/calls``: malformed SDP, bad multipart and JSON bodies) and a
live call's sideband WebSocket (``/v1/realtime?call_id=``).

An HTTP answer is right when it is a 2xx or a 4xx with an OpenAI-style error body; a 5xx
or a dropped connection is a crash. An offer that is answered (201) is hung up at once.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

import httpx
from aiortc import RTCPeerConnection
from hypothesis import strategies as st

from benchmarks.reliability.fuzz_cases import (
    JUNK,
    NASTY_TEXT,
    REALTIME_CASES,
    SESSION,
    Case,
    dumps,
    generate,
)
from benchmarks.reliability.fuzz_oracle import Tally, bad_http
from benchmarks.reliability.fuzz_realtime import fuzz_session, realtime_connect

SECRETS = "/v1/realtime/client_secrets"
CALLS = "/v1/realtime/calls"


@dataclass(frozen=True)
class Request:
    path: str
    body: bytes
    content_type: str | None
    authorized: bool = True


# ------------------------------------------------------------------ client secrets
SECRET_BODIES = st.one_of(
    st.fixed_dictionaries({}, optional={
        "session": SESSION,
        "expires_after": st.fixed_dictionaries({"anchor": st.just("created_at"),
                                                "seconds": st.integers(10, 7200)})})
    .map(lambda d: dumps(d).encode()),
    JUNK.map(lambda j: dumps(j).encode()),
    st.dictionaries(st.sampled_from(["session", "expires_after", "model", "x"]), JUNK,
                    max_size=3).map(lambda d: dumps(d).encode()),
    st.binary(max_size=200),
)
SECRET_REQUESTS = st.builds(
    Request, st.just(SECRETS), SECRET_BODIES,
    st.sampled_from(["application/json", None, "text/plain", "application/x-www-form-urlencoded"]),
    st.sampled_from([True, True, True, False]))


# ------------------------------------------------------------------ WebRTC offers
def _mutations(sdp: str) -> st.SearchStrategy[str]:
    lines = sdp.strip().split("\r\n")

    @st.composite
    def mutate(draw: st.DrawFn) -> str:
        out = list(lines)
        for _ in range(draw(st.integers(1, 3))):
            how = draw(st.sampled_from(["drop", "dup", "value", "insert", "truncate",
                                        "endings", "numbers", "media"]))
            i = draw(st.integers(0, len(out) - 1)) if out else 0
            if how == "drop" and out:
                del out[i]
            elif how == "dup" and out:
                out.insert(i, out[i])
            elif how == "value" and out:
                key = out[i].split("=", 1)[0]
                out[i] = f"{key}={draw(NASTY_TEXT)}"
            elif how == "insert":
                out.insert(i, draw(st.sampled_from(["a=", "m=", "=", "a=candidate:",
                                                    "a=fingerprint:sha-256 ZZ",
                                                    "a=rtpmap:111", "m=audio 9",
                                                    "a=ssrc:1", "a=extmap:x"]))
                           + draw(NASTY_TEXT))
            elif how == "truncate":
                text = "\r\n".join(out)
                return text[:draw(st.integers(0, len(text)))]
            elif how == "endings":
                return draw(st.sampled_from(["\n", "\r", "\r\r\n", "\x00"])).join(out)
            elif how == "numbers" and out:
                out[i] = re.sub(r"\d+", lambda _m: str(draw(st.sampled_from(
                    [-1, 0, 2**32, 2**64, 10**30]))), out[i])
            elif how == "media":
                out.append(draw(st.sampled_from(
                    ["m=audio 0 RTP/AVP 0", "m=video 9 UDP/TLS/RTP/SAVPF 96",
                     "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
                     "m=audio 9 UDP/TLS/RTP/SAVPF", "m=audio x y z"])))
        return "\r\n".join(out) + "\r\n"

    return mutate()


def _offer_requests(sdp: str) -> st.SearchStrategy[Request]:
    bad_sdp = st.one_of(_mutations(sdp), NASTY_TEXT, st.just(""))

    def shaped(text: str, shape: str, session: Any) -> Request:
        if shape == "sdp":
            return Request(CALLS, text.encode("utf-8", "surrogatepass"), "application/sdp")
        if shape == "json":
            body: dict[str, Any] = {"sdp": text}
            if session is not None:
                body["session"] = session
            return Request(CALLS, dumps(body).encode(), "application/json")
        boundary = "fuzzboundary"
        parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"sdp\"\r\n\r\n"
                 f"{text}\r\n"]
        if session is not None:
            parts.append(f"--{boundary}\r\nContent-Disposition: form-data; "
                         f"name=\"session\"\r\n\r\n{dumps(session)}\r\n")
        body_text = "".join(parts) + f"--{boundary}--\r\n"
        return Request(CALLS, body_text.encode("utf-8", "surrogatepass"),
                       f"multipart/form-data; boundary={boundary}")

    return st.one_of(
        st.builds(shaped, bad_sdp, st.sampled_from(["sdp", "json", "multipart"]), st.none()),
        st.builds(shaped, st.just(sdp), st.sampled_from(["json", "multipart"]),
                  st.one_of(JUNK, SESSION)),
        st.builds(Request, st.just(CALLS), st.binary(max_size=300),
                  st.sampled_from(["application/sdp", "multipart/form-data",
                                   "multipart/form-data; boundary=x", "application/json",
                                   "image/png", None])),
    )


async def offer_sdp() -> str:
    """A real browser-like offer: an audio transceiver and the events data channel."""
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio", direction="sendrecv")
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
        assert pc.localDescription is not None
        return pc.localDescription.sdp
    finally:
        await pc.close()


async def _send(http: httpx.AsyncClient, base: str, api_key: str, req: Request,
                tally: Tally, allowed: tuple[int, ...]) -> httpx.Response | None:
    headers = {"Authorization": f"Bearer {api_key if req.authorized else 'sk-wrong'}"}
    if req.content_type is not None:
        headers["Content-Type"] = req.content_type
    tally.events += 1
    try:
        response = await http.post(f"{base}{req.path}", content=req.body, headers=headers)
    except httpx.HTTPError as exc:
        tally.crash(f"{req.path}: no answer ({type(exc).__name__})", req.body)
        return None
    why = bad_http(response.status_code, response.content, allowed)
    if why is not None:
        tally.crash(f"{req.path}: {why}", req.body)
    elif response.status_code >= 400:
        tally.errors += 1
    return response


async def _secrets(base: str, api_key: str, requests: list[Request]) -> Tally:
    tally = Tally("client secrets (POST /v1/realtime/client_secrets)", len(requests) + 1)
    async with httpx.AsyncClient(timeout=30) as http:
        for req in requests:
            await _send(http, base, api_key, req, tally, (200, 400, 401, 413, 415, 422, 429))
        big = Request(SECRETS, b"{\"x\":\"" + b"a" * (2 * 1024 * 1024) + b"\"}",
                      "application/json")
        # Too big (413), unless the key's mint rate was spent first by the fuzzed requests
        # (429, as a fast run on an idle machine does: both are clear refusals).
        await _send(http, base, api_key, big, tally, (413, 429))
    return tally


async def _offers(base: str, api_key: str, requests: list[Request]) -> Tally:
    tally = Tally("WebRTC offers (POST /v1/realtime/calls, malformed SDP and bodies)",
                  len(requests))
    answered = 0
    async with httpx.AsyncClient(timeout=60) as http:
        for req in requests:
            response = await _send(http, base, api_key, req, tally,
                                   (201, 400, 401, 413, 415, 422))
            if response is not None and response.status_code == 201:
                answered += 1
                hangup = await http.post(f"{base}{response.headers['location']}/hangup",
                                         headers={"Authorization": f"Bearer {api_key}"})
                if hangup.status_code != 200:
                    tally.crash(f"hangup {hangup.status_code}", req.body)
    tally.target += f", {answered} answered"
    return tally


async def _sideband(base: str, api_key: str, sdp: str, cases: list[Case]) -> Tally:
    """Realtime cases on the sideband WebSocket of one live call."""
    tally = Tally("WebRTC call sideband WebSocket (/v1/realtime?call_id=)", len(cases))
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(f"{base}{CALLS}", content=sdp.encode(), headers={
            "Authorization": f"Bearer {api_key}", "Content-Type": "application/sdp"})
        if response.status_code != 201:
            tally.crash(f"a valid offer got {response.status_code}", response.text)
            return tally
        location = response.headers["location"]
        call_id = location.rsplit("/", 1)[-1]
        ws_base = "ws" + base.removeprefix("http")
        try:
            await fuzz_session(realtime_connect(ws_base, api_key, f"?call_id={call_id}"),
                               cases, tally, "sideband_")
        finally:
            await http.post(f"{base}{location}/hangup",
                            headers={"Authorization": f"Bearer {api_key}"})
    return tally


@dataclass(frozen=True)
class Inputs:
    sdp: str  # a valid offer
    secrets: list[Request]
    offers: list[Request]
    sideband: list[Case]


async def prepare(n_http: int, n_sdp: int, n_sideband: int) -> Inputs:
    """Everything to send, generated before the servers are needed."""
    sdp = await offer_sdp()
    return Inputs(sdp, *await asyncio.to_thread(lambda: (
        generate(SECRET_REQUESTS, n_http, 2), generate(_offer_requests(sdp), n_sdp, 3),
        generate(REALTIME_CASES, n_sideband, 4))))


async def run(base: str, api_key: str, inputs: Inputs) -> list[Tally]:
    return list(await asyncio.gather(_secrets(base, api_key, inputs.secrets),
                                     _offers(base, api_key, inputs.offers),
                                     _sideband(base, api_key, inputs.sdp, inputs.sideband)))

