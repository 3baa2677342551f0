"""The ``cascade bench`` command line (kept import-light: `cascade --help` loads it)."""

from __future__ import annotations

import argparse
from pathlib import Path

USAGE = """``cascade bench``: voice-to-voice latency over the Realtime API (WebSocket, WebRTC).

    cascade bench                       # embedded: starts `cascade serve`, ~5 min on 2 CPUs
    cascade bench --quick               # one clip, one round, sweep 1-2 (a smoke run)
    cascade bench --transports ws,webrtc   # the same turns over WebSocket and WebRTC
    cascade bench --modes streaming,serial,semantic   # semantic_vad as a third column
    cascade bench --conversation-turns 30 --conversation-gaps 2,5,95   # long conversations
    cascade bench --url ws://host:8000/v1/realtime --api-key KEY
    cascade bench --url wss://.../v1/realtime?model=M --modes default   # any Realtime server
    cascade bench --wav me.wav --wav you.wav   # your recordings (me.txt: its transcript)

Writes report.json (every turn), summary.md and PNG plots to --out and prints a table.
"""

BUILTIN_CLIPS = "question,command,long,pause"  # corpus.BUILTIN names
DEFAULT_INSTRUCTIONS = "You are a helpful voice assistant. Answer in one or two sentences."
# Spoken replies are short; a cap also keeps a small model from rambling for 30 s, which
# would make the run long without telling more about latency.
DEFAULT_MAX_OUTPUT_TOKENS = 60
# The conversation phase: turns per connection and the silences before turns 2, 3, ...
# (seconds; 65 s is longer than the 60 s of uncommitted input a server may hold).
DEFAULT_CONVERSATION_TURNS = 6
DEFAULT_CONVERSATION_GAPS = "1,3,8,65,2"
QUICK_CONVERSATION_TURNS = 3
QUICK_CONVERSATION_GAPS = "1,2"
# Compare-phase transports. WebSocket only by default: a WebRTC turn adds a call setup and
# the reply's playout time (the turn ends when the reply has been played), so both
# transports make the compare phase about 2.5x as long; ask for them with --transports.
DEFAULT_TRANSPORTS = "ws"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="ws(s)://HOST/v1/realtime of a running server "
                   "(default: start `cascade serve` here and stop it afterwards)")
    p.add_argument("--api-key", help="sent as Bearer (default: $CASCADE_BENCH_API_KEY; "
                   "embedded: a random key)")
    p.add_argument("--transports", default=DEFAULT_TRANSPORTS,
                   help="comma list of ws, webrtc: the compare phase speaks every clip over "
                   "each (same corpus and definitions; the other phases use ws). WebRTC "
                   "turns POST an SDP offer to --calls-url (default: %(default)s)")
    p.add_argument("--calls-url",
                   help="WebRTC calls endpoint (default: --url's host + /v1/realtime/calls)")
    p.add_argument("--modes", default="streaming,serial",
                   help="comma list; streaming/serial select cascade's pipeline (server_vad, "
                   "500 ms), semantic = streaming with semantic_vad at --eagerness, any "
                   "other name (e.g. default) sends only standard events; "
                   "MODE+server_vad:MS or MODE+semantic_vad:EAGERNESS picks the turn "
                   "detection, e.g. serial+semantic_vad:high (default: %(default)s)")
    p.add_argument("--eagerness", choices=("low", "medium", "high", "auto"), default="auto",
                   help="semantic_vad eagerness of the modes that do not name one "
                   "(default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2,
                   help="times each clip is spoken per mode (default: %(default)s)")
    p.add_argument("--clips", help=f"built-in clips to use (default: {BUILTIN_CLIPS}; "
                   "with --quick: question)")
    p.add_argument("--wav", action="append", type=Path, default=[],
                   help="your own 16-bit WAV turn (repeatable; replaces the built-in "
                   "corpus; a .txt next to it holds the words, for WER)")
    p.add_argument("--max-concurrency", type=int, default=4,
                   help="sweep 1, 2, 4, ... up to this many sessions (0: no sweep)")
    p.add_argument("--concurrency", help="explicit sweep levels, e.g. 1,3,8")
    p.add_argument("--sweep-modes", help="modes to sweep (default: the first of --modes)")
    p.add_argument("--sweep-turns", type=int, default=2,
                   help="turns per session at each sweep level (default: %(default)s)")
    p.add_argument("--barge-in-rounds", type=int, default=1,
                   help="turns per mode where the user talks over the reply 1 s into it "
                   "(0: none; default: %(default)s)")
    p.add_argument("--conversation-turns", type=int,
                   help="user turns per connection in the conversation phase (default: "
                   f"{DEFAULT_CONVERSATION_TURNS}; with --quick: {QUICK_CONVERSATION_TURNS})")
    p.add_argument("--conversation-gaps",
                   help="seconds of streamed silence before turns 2, 3, ... (repeated when "
                   f"shorter; default: {DEFAULT_CONVERSATION_GAPS}; with --quick: "
                   f"{QUICK_CONVERSATION_GAPS})")
    p.add_argument("--conversation-rounds", type=int, default=1,
                   help="conversations (connections) per mode (default: %(default)s)")
    p.add_argument("--no-conversation", action="store_true",
                   help="skip the conversation phase")
    p.add_argument("--gap-threshold-ms", type=float, default=20.0,
                   help="playback underruns shorter than this are not gaps")
    p.add_argument("--reply-timeout", type=float, default=60.0,
                   help="seconds after the end of speech to wait for a reply")
    p.add_argument("--dialect", choices=("ga", "beta"), default="ga",
                   help="Realtime API dialect: ga (default) or beta (sends "
                   "OpenAI-Beta: realtime=v1 and beta session fields)")
    p.add_argument("--instructions", default=DEFAULT_INSTRUCTIONS)
    p.add_argument("--max-output-tokens", type=int, default=DEFAULT_MAX_OUTPUT_TOKENS,
                   help="reply length cap sent in session.update (default: %(default)s; "
                   "0: no cap)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed turns before measuring (loads caches; default: %(default)s)")
    p.add_argument("--transcription-model", default="whisper-1",
                   help="asked for in session.update so transcripts are sent "
                   "('' to not ask)")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra argument for the embedded `cascade serve` (repeatable)")
    p.add_argument("--quick", action="store_true",
                   help="tiny run: one clip, one round, a 3-turn conversation with short "
                   "gaps, sweep 1-2 with one turn per session")
    p.add_argument("--out", type=Path, help="report folder (default: out/bench/<time>)")
