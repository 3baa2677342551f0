"""The demo page, in a real browser, against the real ``cascade serve``.

Headless Chromium (Debian's) and ``cascade serve`` with its embedded CPU models run in a
loopback-only network namespace (tests/support/browser.py). Chromium opens the page the
way the README tells a person to (``http://127.0.0.1:<port>/``), the page takes its
``ek_`` key from ``/demo/token`` and calls over WebRTC. The microphone is a WebAudio
stream the test speaks piper sentences into when the conversation calls for it
(tests/browser/demo_scenario.py: a barge-in has to land while the reply plays), carried
by Chromium's own WebRTC audio path. One conversation:

1. connect;
2. a question: the user's words appear live and in the log, the reply is heard in the
   page (WebAudio level of the remote track), the latency panel shows the server's
   voice-to-voice mark for the turn;
3. a story, talked over 1.5 s into its audio: the server clears the audio and truncates
   the item, the page marks the turn interrupted and shows only what was heard, and the
   cut is consistent with the audio the page received (``audio_end_ms`` against the
   level record: what was received before the cut, and nothing of it after);
4. the server hangs the call up: the page reconnects by itself, the new call resumes the
   same session (same id in ``session.created``), and a follow-up question is answered in
   the same conversation (its item follows the last item of the old call).

Figures (connect time, per-turn voice-to-voice as heard in the page next to the server's
``first_audio_ms``, the barge-in cut, reconnect time) are printed and recorded as test
properties; they are reported, never asserted: the machine is shared and noisy.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from tests.browser.demo_figures import (
    event_of,
    first_heard,
    is_word_prefix,
    received,
    remote_samples,
    spoken_text,
    state_at,
)
from tests.browser.demo_scenario import FOLLOW_UP, QUESTION, STORY
from tests.support.browser import run_in_netns
from tests.support.speech import near_word_errors

pytestmark = pytest.mark.slow

# audio_end_ms against the page's record: one side undercounts by Piper's zero padding
# and the level window (20 ms), the other by the network and jitter-buffer delay.
CUT_TOLERANCE_MS = 300


def _context(r: dict[str, Any]) -> str:
    """What a failure report needs: the event sequence, the page, the server's log."""
    events = [f"{e['t']} {e['dir']} {e.get('type') or ''}" for e in r["probe"]["events"]
              if not (e.get("type") or "").endswith(".delta")] if "probe" in r else []
    page = r.get("page", {})
    return ("\n--- events ---\n" + "\n".join(events[-120:])
            + f"\n--- page states ---\n{r.get('mic', {}).get('states')}"
            + f"\n--- page log ---\n{json.dumps(page.get('log'), indent=1)}"
            + "\n--- console ---\n" + "\n".join(r["console"][-30:])
            + f"\n--- server log ---\n{r.get('server_log', '')}")


def _turn(r: dict[str, Any], response_id: str) -> dict[str, Any]:
    turns: list[dict[str, Any]] = [t for t in r["page"]["turns"]
                                   if t["responseId"] == response_id]
    assert len(turns) == 1, (response_id, r["page"]["turns"])
    return turns[0]


def _assert_spoken_turn(r: dict[str, Any], step: str, sentence: str, context: str) -> None:
    """The user's words shown (live and in the log), the reply heard, its latency shown."""
    mark, level = r["marks"][step], r["probe"]["threshold"]
    turn = _turn(r, mark["response_id"])
    # The user's transcript: the turn, its bubble, and the live line while speaking.
    assert turn["userFinal"] and near_word_errors(sentence, turn["user"]) <= 2, \
        f"{step}: heard {turn['user']!r} for {sentence!r}{context}"
    bubbles = [b for b in r["page"]["log"] if b["item_id"] == turn["userItemId"]]
    assert [b["text"] for b in bubbles] == [turn["user"]], bubbles
    live = [text for t, text in r["mic"]["live"]
            if mark["played"] <= t <= mark["audio_started"] and text is not None]
    assert "Listening…" in live, f"{step}: the live line never showed speech: {live}"
    partial = "".join(d["delta"] for d in r["mic"]["deltas"]
                      if d["item_id"] == turn["userItemId"]
                      and d["type"] == "conversation.item.input_audio_transcription.delta")
    if partial.strip():  # the server streamed words before the final transcript
        assert partial.strip() in [text.strip() for text in live], \
            f"{step}: the live line never showed {partial!r}: {live}"

    # The reply: heard in the page while the server says its audio plays, by the probe on
    # the remote track and by the page's own level meter.
    assert first_heard(remote_samples(r), mark["audio_started"] - 200,
                       mark["audio_stopped"] + 500, level) is not None, \
        f"{step}: the reply was not heard in the page{context}"
    page_levels = [v for t, v in r["mic"]["remote"]
                   if mark["audio_started"] - 200 <= t <= mark["audio_stopped"] + 500]
    assert max(page_levels, default=0) >= level, f"{step}: the page's meter saw no reply"
    assert turn["assistant"].strip() and not turn["interrupted"], turn
    reply = [b for b in r["page"]["log"] if b["item_id"] == turn["assistantItemId"]]
    assert [b["text"] for b in reply] == [turn["assistant"].strip()], reply

    # The latency panel: this turn's row with the server's first_audio_ms.
    timings = turn["timings"]
    assert timings is not None and isinstance(timings["first_audio_ms"], int | float), turn
    # The page rounds with Math.round (half up); Python's round() goes half to even.
    shown = f"{math.floor(timings['first_audio_ms'] + 0.5)} ms"
    rows = [row for row in r["page"]["latency"] if row["response_id"] == mark["response_id"]]
    assert [row["total"] for row in rows] == [shown], r["page"]["latency"]
    assert any(text == shown[:-3] for _, text in r["mic"]["v2v"]), r["mic"]["v2v"]
    assert shown in (reply[0]["meta"] or ""), reply


def test_the_demo_page_holds_a_conversation_with_cascade_serve(
        browser_tools: None, record_property: Any) -> None:
    run = run_in_netns("tests.browser.demo_scenario:demo_page_scenario",
                       {"turn_timeout_s": 120, "budget_s": 480}, timeout_s=600)
    r = run.result
    context = _context(r)
    figures = r.get("figures")
    print(f"\ndemo page in Chromium against cascade serve: run {run.seconds:.1f} s")
    print("figures:", json.dumps(figures, indent=1))
    for name, value in (figures or {}).items():
        record_property(name, json.dumps(value))
    assert r["failed_step"] is None, f"step failed: {r['failed_step']}{context}"
    assert figures is not None, r.get("figures_error")
    assert not r["mic"]["errors"] and not r["probe"]["errors"], \
        (r["mic"]["errors"], r["probe"]["errors"])
    assert not [c for c in r["console"] if c.startswith("pageerror")], r["console"]

    # 1. Connected through the page's own flow, over WebRTC.
    states = [s for _, s in r["mic"]["states"]]
    assert states[:3] == ["idle", "connecting", "connected"], states
    assert (r["marks"]["hangup"]["call_id"] or "").startswith("rtc_")
    kinds = [e["type"] for e in received(r)]
    assert "response.output_audio.delta" not in kinds, "audio deltas on the data channel"

    # 2. The question.
    _assert_spoken_turn(r, "question", QUESTION, context)

    # 3. Barge-in.
    story, cut = r["marks"]["story"], figures["barge_in"]
    turn = _turn(r, story["response_id"])
    assert near_word_errors(STORY, turn["user"]) <= 2, turn
    assert turn["interrupted"], turn
    (bubble,) = [b for b in r["page"]["log"] if b["item_id"] == turn["assistantItemId"]]
    assert bubble["interrupted"] and "interrupted" in (bubble["meta"] or ""), bubble
    cleared = event_of(r, "output_audio_buffer.cleared", story["response_id"])
    truncated = event_of(r, "conversation.item.truncated", after=story["audio_started"])
    done = event_of(r, "response.done", story["response_id"])
    assert cleared is not None and truncated is not None and done is not None, context
    assert truncated["event"]["item_id"] == turn["assistantItemId"], truncated
    assert truncated["event"]["content_index"] == 0
    assert truncated["t"] <= done["t"]
    assert (cut["response_status"], cut["response_reason"]) == ("cancelled", "turn_detected")
    assert event_of(r, "output_audio_buffer.stopped", story["response_id"]) is None
    # The item keeps what was heard: a non-empty prefix of what the server sent, and the
    # page shows exactly that.
    heard, spoken = cut["heard_transcript"], spoken_text(r, turn["assistantItemId"])
    assert heard.strip() and is_word_prefix(heard, spoken), (heard, spoken)
    assert turn["assistant"] == heard and bubble["text"] == heard.strip(), (turn, bubble)
    (item,) = done["event"]["response"]["output"]
    assert item["status"] == "incomplete" and item["content"][0]["transcript"] == heard, item
    # The cut matches what the page received: no more reply audio than audio_end_ms, not
    # more audio_end_ms than the time the page had between the reply's first sound and the
    # cleared event, and nothing of the reply after the cut.
    audio_end = cut["audio_end_ms"]
    assert audio_end > 0, cut
    assert cut["page_received_ms"] <= audio_end + CUT_TOLERANCE_MS, cut
    assert audio_end <= cut["page_wall_span_ms"] + CUT_TOLERANCE_MS, cut
    assert cut["max_level_after_cut"] is None \
        or cut["max_level_after_cut"] < r["probe"]["threshold"], cut

    # 4. Hung up by the server: the page reconnects on its own and resumes the session.
    hang = r["marks"]["hangup"]
    assert hang["status"] == 200, hang
    lost = state_at(r, "reconnecting", hang["t"])
    again = state_at(r, "connected", hang["t"])
    assert lost is not None and again is not None and lost < again, r["mic"]["states"]
    assert hang["new_call_id"] != hang["call_id"] and hang["new_call_id"].startswith("rtc_")
    sessions = [e["event"]["session"]["id"] for e in received(r)
                if e["type"] == "session.created"]
    assert sessions == [hang["session_id"], hang["session_id"]], sessions
    assert r["page"]["session"]["id"] == hang["session_id"]
    # The same conversation: the follow-up's item comes after the old call's last item.
    _assert_spoken_turn(r, "follow_up", FOLLOW_UP, context)
    old_items = [e["event"]["item"]["id"] for e in received(r)
                 if e["type"] == "conversation.item.added" and e["t"] < hang["t"]]
    follow = _turn(r, r["marks"]["follow_up"]["response_id"])
    (added,) = [e["event"] for e in received(r) if e["type"] == "conversation.item.added"
                and e["event"]["item"]["id"] == follow["userItemId"]]
    assert added["previous_item_id"] == old_items[-1], (added, old_items)
    # The page's log went on: the first call's turns are still shown, before the new one.
    first = _turn(r, r["marks"]["question"]["response_id"])
    ids = [b["item_id"] for b in r["page"]["log"]]
    assert ids.index(first["userItemId"]) < ids.index(follow["userItemId"]), ids
    calls = r["marks"]["calls"]
    assert calls.get("cascade_webrtc_calls") == 1, calls
    assert calls.get('cascade_webrtc_calls_ended_total{reason="hangup"}') == 1, calls
