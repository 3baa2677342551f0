"""What the demo-page scenario (tests/browser/demo_scenario.py) measured, read off its
record: the page's clock (performance.now(), ms) for everything seen in the browser, the
server's own ``cascade.turn.timings`` for its side.

Definitions, the same as the bench's where one exists:

- end of the user's speech: when the test microphone started the clip plus the clip's
  voiced end (``benchmarks.v2v.corpus.voiced_span``);
- heard: the WebAudio level (RMS, 20 ms) of the remote track at or above ``AUDIBLE``,
  as ``PROBE_JS`` measures it on every remote track of the page;
- received: reply audio that is not digital silence. The server's track sends exact
  zeros when it has nothing to play, which decode to a level of 0; speech, even its quiet
  parts, does not. Piper pads each sentence with zeros too, so this undercounts a reply by
  those pads and never overcounts it.

Each function returns None where the record lacks what it needs (a failed step), so a
report can still be made of the rest.
"""

from __future__ import annotations

from typing import Any

from stages.common.text import normalize

Samples = list[tuple[int, float]]

# A level sample stands for at most this long (the probe samples every 20 ms; a late
# timer must not make one sample count for the whole gap).
SAMPLE_MS = 25


def remote_samples(r: dict[str, Any]) -> Samples:
    """Level samples of every remote track the page had (one per call), in time order."""
    taps = [t for t in r["probe"]["taps"] if t["kind"] == "remote"]
    return sorted((int(t), float(v)) for tap in taps for t, v in tap["samples"])


def received(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Server events as the page received them (``PROBE_JS``; deltas carry no body)."""
    return [e for e in r["probe"]["events"] if e["dir"] == "in"]


def event_of(r: dict[str, Any], event_type: str, response_id: str | None = None,
             after: int = -1) -> dict[str, Any] | None:
    """The first ``event_type`` received after ``after`` (of ``response_id`` if given)."""
    for e in received(r):
        if e["type"] != event_type or e["t"] <= after:
            continue
        body = e.get("event") or {}
        rid = body.get("response_id") or (body.get("response") or {}).get("id")
        if response_id is None or rid == response_id:
            return e
    return None


def first_heard(samples: Samples, start: int, end: int, level: float) -> int | None:
    return next((t for t, v in samples if start <= t <= end and v >= level), None)


def last_heard(samples: Samples, start: int, end: int, level: float) -> int | None:
    return next((t for t, v in reversed(samples) if start <= t <= end and v >= level), None)


def received_ms(samples: Samples, start: int, end: int) -> int:
    """How much reply audio (not digital silence) the page received in [start, end]."""
    total, previous = 0, None
    for t, v in samples:
        if start <= t <= end and v > 0 and previous is not None:
            total += min(t - previous, SAMPLE_MS)
        previous = t
    return total


def play_of(r: dict[str, Any], clip: str, after: int = -1) -> dict[str, Any] | None:
    """When the test microphone started ``clip`` (its first play after ``after``)."""
    return next((p for p in r["mic"]["plays"] if p["name"] == clip and p["t"] > after), None)


def speech_end(r: dict[str, Any], clip: str, after: int = -1) -> int | None:
    play = play_of(r, clip, after)
    if play is None:
        return None
    return int(play["t"] + r["clips"][clip]["voiced_end_ms"])


def state_at(r: dict[str, Any], state: str, since: int = -1) -> int | None:
    """When the page's state (``cascadeDemo.state``) first became ``state`` after ``since``."""
    return next((t for t, s in r["mic"]["states"] if s == state and t >= since), None)


def spoken_text(r: dict[str, Any], item_id: str) -> str:
    """The assistant's transcript deltas for an item: what the server said it sends."""
    return "".join(d["delta"] for d in r["mic"]["deltas"]
                   if d["type"] == "response.output_audio_transcript.delta"
                   and d["item_id"] == item_id)


def is_word_prefix(prefix: str, text: str) -> bool:
    words, of = normalize(prefix), normalize(text)
    return of[:len(words)] == words


def turn_figures(r: dict[str, Any], step: str, level: float) -> dict[str, Any] | None:
    """One spoken turn: voice-to-voice as the page heard it next to the server's marks."""
    mark = r["marks"].get(step)
    if not mark or "audio_stopped" not in mark or "timings" not in mark:
        return None
    timings = event_of(r, "cascade.turn.timings", mark["response_id"])
    server = (timings or {}).get("event") or {}
    end = speech_end(r, mark["clip"], mark["played"] - 1)
    heard = first_heard(remote_samples(r), mark["audio_started"] - 200,
                        mark["audio_stopped"] + 500, level)
    return {
        "response_id": mark["response_id"],
        "page_v2v_ms": heard - end if heard is not None and end is not None else None,
        "server_first_audio_ms": server.get("first_audio_ms"),
        "server_endpoint_ms": server.get("endpoint_ms"),
        "server_final_transcript_ms": server.get("final_transcript_ms"),
        "server_llm_first_token_ms": server.get("llm_first_token_ms"),
        "speech_stopped_event_ms": mark["speech_stopped"] - end if end is not None else None,
        "audio_started_event_ms": mark["audio_started"] - end if end is not None else None,
        "heard_after_started_event_ms": heard - mark["audio_started"]
        if heard is not None else None,
        "reply_ms": mark["audio_stopped"] - mark["audio_started"],
    }


def barge_in_figures(r: dict[str, Any], level: float) -> dict[str, Any] | None:
    """The cut as the page saw it: the item's ``audio_end_ms`` next to the reply audio the
    page received before the ``output_audio_buffer.cleared`` event."""
    story = r["marks"].get("story")
    if not story or "cleared" not in story:
        return None
    truncated = event_of(r, "conversation.item.truncated", after=story["audio_started"])
    transcript = event_of(r, "response.output_audio_transcript.done", story["response_id"])
    done = event_of(r, "response.done", story["response_id"])
    if truncated is None or transcript is None or done is None:
        return None
    samples = remote_samples(r)
    started, cleared = story["audio_started"], story["cleared"]
    # The next reply (to the interruption itself) ends the window: from its
    # response.created, which is sent before any of its audio (its buffer "started" event
    # may reach the page after its first frames do on a busy machine).
    following = event_of(r, "response.created", after=cleared)
    # In-flight audio (jitter buffer, output) may still arrive just after the event.
    window_end = min(cleared + 500, following["t"] if following else cleared + 500)
    first = first_heard(samples, started - 200, window_end, level)
    last = last_heard(samples, started - 200, window_end, level)
    first_sound = first_heard(samples, started - 200, window_end, 1e-4)
    interrupt = play_of(r, "stop", started)
    item_id = truncated["event"]["item_id"]
    heard_text = transcript["event"]["transcript"]
    spoken = spoken_text(r, item_id)
    after_cut = [v for t, v in samples
                 if cleared + 500 <= t < (following["t"] if following else cleared + 3000)]
    return {
        "item_id": item_id,
        "audio_end_ms": truncated["event"]["audio_end_ms"],
        "page_received_ms": received_ms(samples, started - 200, window_end),
        "page_audible_span_ms": last - first + 20 if first is not None and last is not None
        else None,
        "page_wall_span_ms": cleared - first_sound if first_sound is not None else None,
        "interrupt_after_audio_started_ms": interrupt["t"] - started if interrupt else None,
        "cut_after_interrupt_voiced_ms": cleared - int(
            interrupt["t"] + r["clips"]["stop"]["voiced_start_ms"]) if interrupt else None,
        "heard_at_cut": any(v >= level for t, v in samples if cleared - 200 <= t <= cleared),
        "max_level_after_cut": max(after_cut, default=None),
        "heard_transcript": heard_text,
        "spoken_transcript": spoken,
        "heard_shorter_than_spoken": len(normalize(heard_text)) < len(normalize(spoken)),
        "response_status": done["event"]["response"]["status"],
        "response_reason": (done["event"]["response"].get("status_details") or {}).get(
            "reason"),
    }


def figures(r: dict[str, Any]) -> dict[str, Any]:
    """Every figure of one run, for the report (and the result JSON)."""
    level = float(r["probe"]["threshold"])
    marks = r["marks"]
    connecting, connected = state_at(r, "connecting"), state_at(r, "connected")
    out: dict[str, Any] = {
        "server_ready_s": r.get("server_ready_s"),
        "connect_ms": connected - connecting if connecting is not None and connected is not None
        else None,
        "question": turn_figures(r, "question", level),
        "barge_in": barge_in_figures(r, level),
        "follow_up": turn_figures(r, "follow_up", level),
    }
    hang = marks.get("hangup")
    if hang:
        again = state_at(r, "connected", hang["t"])
        lost = state_at(r, "reconnecting", hang["t"])
        out["reconnect"] = {
            "hangup_to_reconnecting_ms": lost - hang["t"] if lost is not None else None,
            "hangup_to_connected_ms": again - hang["t"] if again is not None else None,
        }
    return out
