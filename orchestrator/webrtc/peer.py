"""Peer connections: the ICE configuration from the settings, the host candidates the
server offers, and the checks an offer must pass before any work is done for it.

ICE servers: none by default. aiortc would otherwise add a public STUN server, and a
server must not contact third parties unless its operator says so; STUN/TURN servers
are configured with ``CASCADE_ICE_SERVERS``.

Host candidates: aioice offers every non-loopback interface address. Two cases need
more control, so ``CASCADE_ICE_HOST_ADDRESSES`` replaces that list: a host with several
interfaces where only one is reachable by clients, and loopback-only setups (a network
namespace with only ``lo``: tests, a browser on the same machine), where 127.0.0.1 must
be offered or no pair can form. aioice reads the list from a module function; the
override is installed once per process and reads the addresses of the call being set up.
"""

from __future__ import annotations

import contextvars
import ipaddress
from collections.abc import Sequence

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer

from orchestrator.settings import ServeSettings

_HOST_ADDRESSES: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "cascade_ice_host_addresses", default=None)
_original_get_host_addresses = aioice.ice.get_host_addresses


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    chosen = _HOST_ADDRESSES.get()
    if chosen is None:
        return _original_get_host_addresses(use_ipv4, use_ipv6)
    out = []
    for address in chosen:
        version = ipaddress.ip_address(address).version
        if (version == 4 and use_ipv4) or (version == 6 and use_ipv6):
            out.append(address)
    return out


aioice.ice.get_host_addresses = _get_host_addresses


def use_host_addresses(addresses: Sequence[str]) -> None:
    """Offer exactly ``addresses`` as host candidates for peer connections gathered in
    the current task (and tasks it starts); empty: aioice's own choice."""
    for address in addresses:
        ipaddress.ip_address(address)  # a bad address fails here, not inside aioice
    _HOST_ADDRESSES.set(tuple(addresses) or None)


def configuration(settings: ServeSettings) -> RTCConfiguration:
    servers = []
    for server in settings.ice_servers:
        urls = server.get("urls")
        if not urls:
            raise ValueError(f"ICE server without urls: {server}")
        username = server.get("username")
        credential = server.get("credential")
        servers.append(RTCIceServer(
            urls=urls, username=username if isinstance(username, str) else None,
            credential=credential if isinstance(credential, str) else None))
    return RTCConfiguration(iceServers=servers)


class InvalidOffer(ValueError):
    """The offer cannot start a call; the message says why (sent to the client)."""


MAX_SDP_BYTES = 64 * 1024


def check_offer(sdp: str) -> None:
    """Cheap checks before aiortc parses the offer: size, shape, an audio section."""
    if not sdp.strip():
        raise InvalidOffer("the SDP offer is empty")
    if len(sdp.encode()) > MAX_SDP_BYTES:
        raise InvalidOffer(f"the SDP offer is larger than {MAX_SDP_BYTES} bytes")
    lines = [line.strip() for line in sdp.strip().splitlines()]
    if not lines[0].startswith("v=0"):
        raise InvalidOffer("not an SDP offer: it must start with 'v=0'")
    for attribute, what in (("a=ice-ufrag:", "ICE credentials"),
                            ("a=fingerprint:", "a DTLS fingerprint")):
        if not any(line.startswith(attribute) for line in lines):
            raise InvalidOffer(f"the SDP offer has no {what} ({attribute}...): WebRTC "
                               "media needs ICE and DTLS")
    if not any(line.startswith("m=audio ") for line in lines):
        raise InvalidOffer("the SDP offer has no audio section (m=audio): a Realtime call "
                           "needs the microphone track (or a recvonly audio transceiver)")
    _check_sections(lines)


_DIRECTIONS = ("a=sendrecv", "a=sendonly", "a=recvonly", "a=inactive")


def _check_sections(lines: list[str]) -> None:
    """What aiortc assumes of an offer without checking (found by fuzzing: each one was an
    AttributeError or ValueError while answering, a 500): a BUNDLE group names only
    sections the offer has, and every audio/video section states its direction."""
    sections: list[list[str]] = []
    for line in lines:
        if line.startswith("m="):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
    mids = {line.removeprefix("a=mid:").strip() for section in sections for line in section
            if line.startswith("a=mid:")}
    for line in lines:
        if line.startswith("a=group:BUNDLE"):
            missing = [mid for mid in line.split()[1:] if mid not in mids]
            if missing:
                raise InvalidOffer(f"the SDP offer's BUNDLE group names media sections it "
                                   f"does not have: {' '.join(missing)[:80]}")
    for section in sections:
        if section[0].startswith(("m=audio", "m=video")) and not any(
                line.startswith(_DIRECTIONS) for line in section):
            raise InvalidOffer(f"the SDP offer's section {section[0][:40]!r} has no direction "
                               "(a=sendrecv, a=sendonly, a=recvonly or a=inactive)")


# aiortc's audio receiver holds every packet until four later ones have arrived (prefetch
# 4: 80 ms) before decoding it, which suits a player smoothing jitter. The server does not
# play what it receives: it feeds a VAD and ASR, for which each 20 ms of that wait is 20 ms
# later end-of-turn detection. One packet (the least the buffer allows) still reorders
# within its 16-packet window. The attribute is private to aiortc (pinned in
# pyproject.toml); tests/orchestrator/webrtc/test_peer.py fails if it moves.
RECEIVE_PREFETCH = 1
_JITTER_ATTR = "_RTCRtpReceiver__jitter_buffer"


def decode_promptly(pc: RTCPeerConnection) -> None:
    """Audio receivers of ``pc`` decode each packet as soon as the next one arrives."""
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind != "audio" or not hasattr(receiver, _JITTER_ATTR):
            continue
        current = getattr(receiver, _JITTER_ATTR)
        setattr(receiver, _JITTER_ATTR, JitterBuffer(capacity=current.capacity,
                                                     prefetch=RECEIVE_PREFETCH))
