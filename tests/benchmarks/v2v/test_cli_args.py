"""`cascade bench` argument handling (no server, no models)."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.v2v.cli import _schedule, _target, calls_url, mode_specs
from benchmarks.v2v.options import add_arguments


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_schedule_from_flags() -> None:
    s = _schedule(_args())
    assert s.modes == ("streaming", "serial") and s.concurrency == (1, 2, 4)
    assert s.sweep_modes == ("streaming",) and s.barge_in_rounds == 1 and s.warmup == 1
    s = _schedule(_args("--concurrency", "3,1,3", "--modes", "default", "--max-concurrency",
                        "9"))
    assert s.concurrency == (1, 3) and s.sweep_modes == ("default",)
    s = _schedule(_args("--max-concurrency", "0"))
    assert s.concurrency == () and s.sweep_modes == ()
    # compare 2 rounds x 4 clips x 2 modes, a 6-turn conversation per mode, barge-in.
    assert s.total_turns(4) == 2 * 4 * 2 + 6 * 2 + 2


def test_conversation_flags() -> None:
    s = _schedule(_args())
    assert (s.conversation_rounds, s.conversation_turns) == (1, 6)
    assert s.conversation_gaps == (1.0, 3.0, 8.0, 65.0, 2.0)
    assert max(s.conversation_gaps) > 60  # longer than the old 60 s input limit
    quick = _args("--quick")
    s = _schedule(quick)
    assert (s.conversation_turns, s.conversation_gaps) == (3, (1.0, 2.0))
    s = _schedule(_args("--quick", "--conversation-turns", "5", "--conversation-gaps", "0.5"))
    assert (s.conversation_turns, s.conversation_gaps) == (5, (0.5,))
    s = _schedule(_args("--conversation-turns", "30", "--conversation-gaps", "2,95",
                        "--conversation-rounds", "2", "--max-concurrency", "0",
                        "--barge-in-rounds", "0"))
    assert (s.conversation_rounds, s.conversation_turns, s.conversation_gaps) == (
        2, 30, (2.0, 95.0))
    assert s.total_turns(1) == 2 * 1 * 2 + 2 * 30 * 2
    assert s.mode_order(0) == ("streaming", "serial") == s.mode_order(1)[::-1]
    for off in (("--no-conversation",), ("--conversation-turns", "0"),
                ("--conversation-rounds", "0")):
        s = _schedule(_args(*off))
        assert (s.conversation_rounds, s.conversation_turns, s.conversation_gaps) == (
            0, 0, ()), off
    # One turn needs no gaps.
    assert _schedule(_args("--conversation-turns", "1", "--conversation-gaps", "")
                     ).conversation_turns == 1


def test_turn_detection_modes() -> None:
    s = _schedule(_args("--modes", "streaming,serial,semantic,streaming"))
    assert s.modes == ("streaming", "serial", "semantic")  # each mode once
    assert s.mode_order(1) == ("semantic", "serial", "streaming")
    assert s.total_turns(4) == 2 * 4 * 3 + 6 * 3 + 3 + (1 + 2 + 4) * 2
    assert _args().eagerness == "auto"
    specs = mode_specs(s.modes, "high")
    assert [(m.name, m.pipeline, m.turn_detection_config()) for m in specs] == [
        ("streaming", "streaming", {"type": "server_vad", "silence_duration_ms": 500}),
        ("serial", "serial", {"type": "server_vad", "silence_duration_ms": 500}),
        ("semantic", "streaming", {"type": "semantic_vad", "eagerness": "high"})]


@pytest.mark.parametrize("argv", [("--modes", ","), ("--concurrency", "1,x"),
                                  ("--modes", "streaming,semantic+server_vad"),
                                  ("--modes", "serial+semantic_vad:eager"),
                                  ("--sweep-modes", "streaming+nothing"),
                                  ("--concurrency", "0,2"), ("--rounds", "0"),
                                  ("--warmup", "-1"), ("--barge-in-rounds", "-2"),
                                  ("--conversation-turns", "-1"),
                                  ("--conversation-gaps", "1,x"),
                                  ("--conversation-gaps", "1,-3"),
                                  ("--conversation-gaps", ","),
                                  ("--conversation-rounds", "-1"),
                                  ("--transports", ""), ("--transports", "ws,sip"),
                                  ("--transports", "webrtc", "--dialect", "beta")])
def test_bad_flags_exit_with_a_reason(argv: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit, match="cascade bench: "):
        _schedule(_args(*argv))


@pytest.mark.parametrize("given,used", [
    ("http://127.0.0.1:8000/v1/realtime", "ws://127.0.0.1:8000/v1/realtime"),
    ("https://voice.example.test/v1/realtime?model=m", "wss://voice.example.test/v1/realtime?model=m"),
    ("wss://h/v1/realtime", "wss://h/v1/realtime"),
])
def test_http_urls_become_websocket_urls(given: str, used: str) -> None:
    with _target(given, "k", []) as url:
        assert url == used


def test_transports() -> None:
    assert _schedule(_args()).transports == ("ws",)  # the default
    s = _schedule(_args("--transports", "ws,webrtc,ws", "--rounds", "3", "--max-concurrency",
                        "0", "--no-conversation", "--barge-in-rounds", "0"))
    assert s.transports == ("ws", "webrtc")
    # Every clip, mode and round over both transports, the order alternating by round.
    assert s.total_turns(4) == 3 * 4 * 2 * 2
    assert s.transport_order(0) == ("ws", "webrtc") == s.transport_order(1)[::-1]
    # Only the compare phase is doubled.
    s = _schedule(_args("--transports", "webrtc,ws"))
    assert s.total_turns(4) == 2 * 4 * 2 * 2 + 6 * 2 + 2 + (1 + 2 + 4) * 2


@pytest.mark.parametrize("ws,calls", [
    ("ws://127.0.0.1:8000/v1/realtime", "http://127.0.0.1:8000/v1/realtime/calls"),
    ("wss://voice.example.test/v1/realtime/?model=m",
     "https://voice.example.test/v1/realtime/calls?model=m"),
])
def test_calls_url_is_next_to_the_websocket_url(ws: str, calls: str) -> None:
    assert calls_url(ws) == calls
