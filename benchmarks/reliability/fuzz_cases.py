"""Hostile inputs, generated with hypothesis: Realtime client events (valid, broken and
junk), raw frames, and the bodies and frames of the HTTP and stage APIs.

Each case says what a correct server does with it (``expect``):

- ``"error"``: the input is wrong by construction (not JSON, not an object, no or an
  unknown ``type``, an unknown top-level field, a required field missing or of a type
  nothing coerces to): an ``error`` event must answer it.
- ``"ok"``: a well-formed event: no protocol error may answer it (state errors such as
  ``item_not_found`` are allowed), and it gets its reply event where it has one.
- ``"any"``: junk inside an otherwise valid event; either answer is fine, but it must be
  answered (reply event or error) and nothing may fail inside the server.

Cases are generated first, then replayed against the live servers (``generate``), so a
run is reproducible: ``seed`` fixes the draw.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

Expect = Literal["error", "ok", "any"]
T = TypeVar("T")


@dataclass(frozen=True)
class Case:
    """One frame to send and what must answer it."""

    label: str  # the event type it is about, or the kind of raw frame
    frame: str | bytes
    expect: Expect
    event_id: str | None = None  # the top-level event_id a correct server echoes


def generate(strategy: st.SearchStrategy[T], n: int, salt: int = 0) -> list[T]:
    """``n`` examples of ``strategy``, the same ones on every run (fixed seeds). One
    example per draw: drawing lists of them repeats the simplest ones far more often."""
    out: list[T] = []
    round_ = 0
    while len(out) < n and round_ < 50:
        out.extend(_draw(strategy, n - len(out), 1000 * salt + round_))
        round_ += 1
    return out[:n]


def _draw(strategy: st.SearchStrategy[T], n: int, seed_value: int) -> list[T]:
    batch: list[T] = []

    @seed(seed_value)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example: T) -> None:
        batch.append(example)

    collect()
    return batch


# ------------------------------------------------------------------ building blocks
# Text with everything a client can put in JSON: NUL, control characters, astral planes,
# RTL marks and lone surrogates (valid JSON escapes, invalid UTF-8 when re-encoded).
ANY_CHAR = st.characters(codec=None, exclude_categories=())
UNICODE = st.text(ANY_CHAR, max_size=40)
SURROGATES = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=4)
NASTY_TEXT = st.one_of(
    UNICODE,
    st.sampled_from(["", "\x00", "\u202e", "\ufeff", "\U0001d54f" * 10, "\\", "\"", "%s%n", "null",
                     "a" * 5000]),
    st.builds(lambda a, b: a + b, st.text(max_size=8), SURROGATES),
)
PLAIN_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)
HUGE_INT = st.sampled_from([2**31, 2**53 + 1, 2**63, 2**64 + 7, -(2**63) - 1, 10**40,
                            10**400])
NUMBERS = st.one_of(st.integers(), HUGE_INT,
                    st.floats(allow_nan=True, allow_infinity=True))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, NASTY_TEXT)
JUNK: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
# JSON values whose strings are all valid Unicode text.
TEXT_JUNK: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, PLAIN_TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(PLAIN_TEXT, inner, max_size=4)),
    max_leaves=12,
)
# Wrong types for a string field / an int field / an object field (nothing coerces).
NOT_STR: st.SearchStrategy[Any] = st.one_of(
    st.booleans(), st.integers(), st.lists(SCALARS, max_size=2),
    st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))
NOT_INT: st.SearchStrategy[Any] = st.one_of(
    st.text(st.characters(categories=["L"]), min_size=1, max_size=5),
    st.lists(st.integers(), max_size=2), st.just({}), st.just(1.5), st.integers(max_value=-1))
NOT_OBJ: st.SearchStrategy[Any] = st.one_of(
    st.booleans(), st.integers(), NASTY_TEXT, st.lists(SCALARS, max_size=3))


def dumps(obj: Any) -> str:
    """JSON as a client sends it (NaN/Infinity and escaped lone surrogates included)."""
    return json.dumps(obj, ensure_ascii=True)


def _with_id(ev: dict[str, Any], event_id: str | None) -> dict[str, Any]:
    return ev if event_id is None else {**ev, "event_id": event_id}


EVENT_IDS = st.one_of(st.none(), st.text(st.characters(codec="ascii"), max_size=12)
                      .map(lambda s: f"evt_{s}"))

# ------------------------------------------------------------------ valid payloads
VOICES = st.sampled_from(["alloy", "ash", "marin", "cedar", "verse"])
FORMATS = st.sampled_from([{"type": "audio/pcm", "rate": 24000}, {"type": "audio/pcmu"},
                           {"type": "audio/pcma"}])
TURN_DETECTION = st.one_of(
    st.none(),
    st.fixed_dictionaries({"type": st.just("server_vad")}, optional={
        "threshold": st.floats(0, 1), "silence_duration_ms": st.integers(0, 2000),
        "prefix_padding_ms": st.integers(0, 1000), "create_response": st.booleans()}),
    st.fixed_dictionaries({"type": st.just("semantic_vad")}, optional={
        "eagerness": st.sampled_from(["low", "medium", "high", "auto"])}),
)
TOOL = st.fixed_dictionaries({"type": st.just("function"),
                              "name": st.text("abcdefgh_", min_size=1, max_size=10)},
                             optional={"description": PLAIN_TEXT,
                                       "parameters": st.just({"type": "object"})})
SESSION = st.fixed_dictionaries({}, optional={
    "type": st.just("realtime"),
    "instructions": PLAIN_TEXT,
    "output_modalities": st.sampled_from([["audio"], ["text"]]),
    "audio": st.fixed_dictionaries({}, optional={
        "input": st.fixed_dictionaries({}, optional={"format": FORMATS,
                                                     "turn_detection": TURN_DETECTION}),
        "output": st.fixed_dictionaries({}, optional={"voice": VOICES,
                                                      "speed": st.floats(0.25, 1.5)})}),
    "tools": st.lists(TOOL, max_size=2),
    "tool_choice": st.sampled_from(["auto", "none", "required"]),
    "temperature": st.floats(0, 2),
    "max_output_tokens": st.one_of(st.integers(1, 4096), st.just("inf")),
    "truncation": st.sampled_from(["auto", "disabled"]),
    "tracing": TEXT_JUNK,  # any JSON is accepted there, as long as it is valid text
})
CONTENT = {
    "user": st.one_of(st.fixed_dictionaries({"type": st.just("input_text"),
                                             "text": PLAIN_TEXT})),
    "system": st.fixed_dictionaries({"type": st.just("input_text"), "text": PLAIN_TEXT}),
    "assistant": st.fixed_dictionaries({"type": st.sampled_from(["output_text", "text"]),
                                        "text": PLAIN_TEXT}),
}
ITEM_IDS = st.one_of(st.none(), st.text("abcdef0123456789", min_size=1, max_size=12)
                     .map(lambda s: f"item_fz{s}"))
MESSAGE = st.sampled_from(["user", "system", "assistant"]).flatmap(
    lambda role: st.fixed_dictionaries(
        {"type": st.just("message"), "role": st.just(role),
         "content": st.lists(CONTENT[role], min_size=1, max_size=2)},
        optional={"id": ITEM_IDS.filter(bool)}))
ITEM = st.one_of(
    MESSAGE,
    st.fixed_dictionaries({"type": st.just("function_call"), "name": st.text("abc", min_size=1),
                           "arguments": PLAIN_TEXT}, optional={"call_id": PLAIN_TEXT}),
    st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": PLAIN_TEXT,
                           "output": PLAIN_TEXT}),
)
# Silence (or near silence: no turn starts) of 20..200 ms at 24 kHz pcm16, base64.
AUDIO_B64 = st.tuples(st.integers(1, 10), st.integers(0, 3)).map(
    lambda t: base64.b64encode(bytes([t[1], 0]) * (480 * t[0])).decode())
# A response that costs the CPU LLM almost nothing: text only, a few tokens, no history.
RESPONSE = st.fixed_dictionaries({
    "output_modalities": st.just(["text"]), "max_output_tokens": st.integers(1, 3),
    "conversation": st.just("none"), "input": st.just([]),
}, optional={"instructions": PLAIN_TEXT, "metadata": st.dictionaries(
    st.text("abc", max_size=4), PLAIN_TEXT, max_size=2), "temperature": st.floats(0, 2)})

VALID_BODIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "session.update": st.fixed_dictionaries({"session": SESSION}),
    "input_audio_buffer.append": st.fixed_dictionaries({"audio": AUDIO_B64}),
    "input_audio_buffer.commit": st.just({}),
    "input_audio_buffer.clear": st.just({}),
    "conversation.item.create": st.fixed_dictionaries(
        {"item": ITEM}, optional={"previous_item_id": st.one_of(st.none(), st.just("root"),
                                                                 ITEM_IDS)}),
    "conversation.item.delete": st.fixed_dictionaries({"item_id": ITEM_IDS.filter(bool)}),
    "conversation.item.retrieve": st.fixed_dictionaries({"item_id": ITEM_IDS.filter(bool)}),
    "conversation.item.truncate": st.fixed_dictionaries({
        "item_id": ITEM_IDS.filter(bool), "content_index": st.integers(0, 3),
        "audio_end_ms": st.integers(0, 10**6)}),
    "response.create": st.fixed_dictionaries({"response": RESPONSE}),
    "response.cancel": st.fixed_dictionaries({}, optional={"response_id": PLAIN_TEXT}),
    "output_audio_buffer.clear": st.just({}),
}
EVENT_TYPES = tuple(VALID_BODIES)
# The required fields of each event and the wrong types that cannot be coerced into them.
REQUIRED: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "session.update": {"session": NOT_OBJ},
    "input_audio_buffer.append": {"audio": NOT_STR},
    "conversation.item.create": {"item": NOT_OBJ},
    "conversation.item.delete": {"item_id": NOT_STR},
    "conversation.item.retrieve": {"item_id": NOT_STR},
    "conversation.item.truncate": {"item_id": NOT_STR, "content_index": NOT_INT,
                                   "audio_end_ms": NOT_INT},
}


@st.composite
def valid_event(draw: st.DrawFn) -> Case:
    etype = draw(st.sampled_from(EVENT_TYPES))
    event_id = draw(EVENT_IDS)
    body = draw(VALID_BODIES[etype])
    return Case(etype, dumps(_with_id({"type": etype, **body}, event_id)), "ok", event_id)


@st.composite
def broken_event(draw: st.DrawFn) -> Case:
    """A valid event broken in one way that must be refused."""
    etype = draw(st.sampled_from(EVENT_TYPES))
    event_id = draw(EVENT_IDS)
    ev = {"type": etype, **draw(VALID_BODIES[etype])}
    required = REQUIRED.get(etype, {})
    how = draw(st.sampled_from(["unknown_field", "drop_required", "wrong_type", "bad_id",
                                "bad_audio"] if etype == "input_audio_buffer.append" else
                               ["unknown_field", "drop_required", "wrong_type", "bad_id"]))
    if how == "drop_required" and required:
        del ev[draw(st.sampled_from(sorted(required)))]
    elif how == "wrong_type" and required:
        field = draw(st.sampled_from(sorted(required)))
        ev[field] = draw(required[field])
    elif how == "bad_id":
        ev["event_id"] = draw(NOT_STR)
        return Case(etype, dumps(ev), "error", None)
    elif how == "bad_audio":
        if draw(st.booleans()):  # an odd byte count: refused for pcm16, whole G.711 samples
            ev["audio"] = draw(st.binary(min_size=1, max_size=300).filter(
                lambda b: len(b) % 2 == 1).map(lambda b: base64.b64encode(b).decode()))
            return Case(etype, dumps(_with_id(ev, event_id)), "any", event_id)
        ev["audio"] = draw(st.one_of(
            st.text("!@#$%^&*~ \n", min_size=1, max_size=20),           # outside the alphabet
            st.text("ABCDabcd0123", min_size=1, max_size=7)
            .filter(lambda s: len(s) % 4 != 0)))                         # bad padding
    else:  # an unknown field, at the top level (forbidden on every client event)
        name = draw(st.text(st.characters(codec="ascii"), min_size=1, max_size=10)
                    .filter(lambda k: k not in ev and k != "event_id"))
        ev[name] = draw(JUNK)
    return Case(etype, dumps(_with_id(ev, event_id)), "error", event_id)


def _replace_deep(draw: st.DrawFn, node: Any, depth: int = 0) -> Any:
    """``node`` with one value somewhere inside replaced by junk."""
    if isinstance(node, dict) and node and (depth == 0 or draw(st.booleans())):
        key = draw(st.sampled_from(sorted(node)))
        return {**node, key: _replace_deep(draw, node[key], depth + 1)}
    if isinstance(node, list) and node and draw(st.booleans()):
        i = draw(st.integers(0, len(node) - 1))
        return [*node[:i], _replace_deep(draw, node[i], depth + 1), *node[i + 1:]]
    return draw(JUNK)


@st.composite
def junk_event(draw: st.DrawFn) -> Case:
    """A valid event with junk somewhere inside (type kept), or beta-shaped junk."""
    etype = draw(st.sampled_from(EVENT_TYPES))
    event_id = draw(EVENT_IDS)
    body = draw(VALID_BODIES[etype])
    beta_keys = ["modalities", "input_audio_format", "output_audio_format", "turn_detection",
                 "voice", "input_audio_transcription", "max_response_output_tokens", "audio"]
    if etype in ("session.update", "response.create") and draw(st.booleans()):
        inner = "session" if etype == "session.update" else "response"
        body = {inner: draw(st.dictionaries(st.sampled_from(beta_keys), JUNK, min_size=1,
                                            max_size=3))}
    elif body:
        body = _replace_deep(draw, body)
    else:
        body = {"response_id": draw(JUNK)} if etype == "response.cancel" else {}
    return Case(etype, dumps(_with_id({"type": etype, **body}, event_id)), "any", event_id)


@st.composite
def raw_frame(draw: st.DrawFn) -> Case:
    """Frames that are not a client event at all."""
    kind = draw(st.sampled_from(["not_json", "not_object", "no_type", "type_not_str",
                                 "unknown_type", "binary", "nested", "utf8_junk"]))
    if kind == "not_json":
        text = draw(st.one_of(st.text(min_size=1, max_size=60), st.sampled_from(
            ["{", "}", "{\"type\":", "[1,", "nul", "{'type': 'x'}", "\x00", " ", "",
             "{\"type\":\"session.update\"", "1e99999", "\"\\ud800"])))
        try:
            json.loads(text)
            return Case(kind, text, "any")
        except ValueError:
            return Case(kind, text, "error")
    if kind == "not_object":
        return Case(kind, dumps(draw(JUNK.filter(lambda j: not isinstance(j, dict)))), "error")
    if kind == "no_type":
        ev = draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k != "type"), JUNK,
                                  max_size=4))
        return Case(kind, dumps(ev), "error", _str_id(ev))
    if kind == "type_not_str":
        ev = {"type": draw(NOT_STR.filter(lambda v: v is not None))}
        return Case(kind, dumps(ev), "error")
    if kind == "unknown_type":
        etype = draw(st.one_of(NASTY_TEXT, st.sampled_from(
            ["transcription_session.update", "session.updated", "response.done", "error",
             "Session.Update", "session.update ", "input_audio_buffer.append\x00"])))
        if etype in EVENT_TYPES:
            etype += "!"
        return Case(kind, dumps({"type": etype, "event_id": "evt_unknown"}), "error",
                    "evt_unknown")
    if kind == "binary":  # raw input audio (a cascade extension) in the session's format:
        # an odd size is refused for pcm16, but is whole samples once a valid session.update
        # switched the input to G.711
        data = draw(st.binary(min_size=1, max_size=2000).filter(lambda b: len(b) % 2 == 1))
        return Case(kind, data, "any")
    if kind == "nested":
        depth = draw(st.sampled_from([64, 500, 1000, 5000, 100_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{\"a\":", "}")]))
        inner = opener * depth + "1" + closer * depth
        where = draw(st.sampled_from(["top", "session", "tracing", "item"]))
        if where == "top":
            return Case(kind, inner, "error")
        if where == "session":
            return Case(kind, f"{{\"type\":\"session.update\",\"session\":{inner}}}", "error")
        if where == "tracing":
            return Case(kind, f"{{\"type\":\"session.update\",\"session\":{{\"tracing\":"
                        f"{inner}}}}}", "any")
        return Case(kind, f"{{\"type\":\"conversation.item.create\",\"item\":{inner}}}",
                    "error")
    # utf8_junk: bytes sent in a *text* frame are checked by the WebSocket layer; here
    # a JSON string with every escape a decoder can stumble on.
    text = draw(st.text(ANY_CHAR, max_size=30))
    return Case(kind, dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}),
        "any")


def _str_id(ev: dict[str, Any]) -> str | None:
    value = ev.get("event_id")
    return value if isinstance(value, str) else None


REALTIME_CASES: st.SearchStrategy[Case] = st.one_of(
    valid_event(), valid_event(), broken_event(), broken_event(), junk_event(), junk_event(),
    raw_frame())


def huge_frames(max_event_bytes: int) -> list[Case]:
    """Frames at and over the size limit (built directly: too big to draw)."""
    audio_len = (max_event_bytes - 100) // 4 * 4
    return [
        # Under the limit, but an append of minutes of audio: refused as audio_too_large.
        Case("huge", dumps({"type": "input_audio_buffer.append", "audio": "A" * audio_len}),
             "error"),
        # Over the limit: refused before parsing.
        Case("huge", "[" + "0," * (max_event_bytes // 2) + "0]", "error"),
        # A huge string field under the limit.
        Case("huge", dumps({"type": "conversation.item.retrieve",
                            "item_id": "x" * (max_event_bytes // 2)}), "error"),
        Case("huge", b"\x01" * (max_event_bytes + 1), "error"),
    ]
