"""The overlap policy: when each stage starts, what is held back, what barge-in cancels.

Read top-down, this is the whole timing behaviour of a turn in streaming mode:

1. Audio in.   Every client frame is resampled once to 16 kHz. The VAD scores it in
               process; from the first voiced frame (minus ``prefix_padding_ms``) the
               audio also streams into ASR, so transcription runs while the user speaks.
               Newly *stable* ASR text is sent as transcription deltas (it never retracts).
               Each time it grows (no speculative reply running), the LLM also *reads*
               the reply's prompt so far — instructions, history, the user's stable words
               — as a prefill-only primer (``prefill_while_speaking``), so that at the
               pause only the last words are left to prefill. A primer never queues: an
               LLM busy with replies skips it.
2. Pause.      After ``asr_pause_hint_ms`` of silence the ASR is told where the speech
               paused (``AsrStream.end_of_speech``) and decodes up to there at once,
               instead of at its next scheduled decode. When the VAD has heard
               ``speculative_pause_ms`` of silence inside a turn and the latest ASR
               hypothesis covers the speech up to ``speculative_uncovered_ms`` before
               its end, the LLM starts on that text (a *speculative* reply, revision r)
               and its tokens already stream into TTS phrase by phrase. Nothing of it
               reaches the client yet. A newer hypothesis with other words during the
               same pause replaces it (r cancelled, r+1 on the new text).
3. Resume.     If the user speaks again before the endpoint, revision r is cancelled
               (LLM request aborted, TTS stream closed); step 2 may fire again later.
4. Endpoint.   ``server_vad``: after ``silence_duration_ms`` of silence the turn ends
               (speech_stopped). ``semantic_vad``: an end-of-turn model (Smart Turn)
               hears the turn's audio from ``first_check_ms`` of silence on, again every
               ``recheck_ms``; a probability >= ``threshold`` ends the turn there, else
               it ends after ``max_wait_ms`` (``SEMANTIC_EAGERNESS``).
               ASR finalizes in the background (VAD and barge-in keep running on the
               next frames) — nearly free, since the last decode already covered the
               speech; past ``asr_finalize_s`` the turn ends on the newest hypothesis.
               If the final transcript equals the speculative text (after
               normalization), revision r is *released*: its buffered audio goes out at
               once. Otherwise r is cancelled and r+1 starts on the final text. A turn
               that reaches ``max_turn_ms`` of audio is ended the same way (a user who
               never pauses, or a noisy line, cannot fill the input buffer).
5. Reply out.  Released audio is paced at real time plus ``playout_lead_ms`` (see
               ``playout.py``); the LLM keeps generating and TTS keeps synthesizing ahead
               of playback.
6. Barge-in.   Voiced speech of at least ``barge_in_min_ms`` while a reply plays cancels
               LLM and TTS at that VAD decision, and the assistant item keeps only the
               words already played (TTS word timings x audio sent).

7. Deadlines.  No step waits on a stage without one (``StageDeadlines``): audio reaches
               ASR through a bounded buffer, never blocking the VAD; an ASR stream that
               does not open, falls behind or fails ends its turn on the hypothesis so
               far; an LLM with no first token (or a stall between tokens) and a TTS
               that owes audio and produces none fail that response only (status
               ``failed``, an ``error`` event), and the next turn starts afresh.

Positions are on one clock: the session's 16 kHz input stream (samples since the session
started). Each turn's ASR stream records where it started on that clock, so "the
hypothesis covers the speech" means the same on turn 30 as on turn 1.

Control signals (speech_started/stopped, cancel, truncate) are never delayed or dropped
by an interruption; reply data (text deltas, audio) is what an interruption cancels.

``serial`` mode is the baseline: no speculation, and at the endpoint the full transcript,
then the full LLM reply, then the full synthesis, then sending.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class SemanticRule:
    """When a ``semantic_vad`` turn ends (see step 4)."""

    first_check_ms: int
    threshold: float
    max_wait_ms: int
    recheck_ms: int = 150


# OpenAI documents the longest waits (low 8 s, medium 4 s, high 2 s; auto = medium); the
# first check and the threshold are ours: Smart Turn reads a pause of ~400 ms or more as
# "finished" almost regardless of the words, so earlier checks are what make it eager.
SEMANTIC_EAGERNESS: dict[str, SemanticRule] = {
    "high": SemanticRule(first_check_ms=150, threshold=0.5, max_wait_ms=2000),
    "medium": SemanticRule(first_check_ms=250, threshold=0.5, max_wait_ms=4000),
    "auto": SemanticRule(first_check_ms=250, threshold=0.5, max_wait_ms=4000),
    "low": SemanticRule(first_check_ms=400, threshold=0.7, max_wait_ms=8000),
}


@dataclass(frozen=True)
class OverlapPolicy:
    # VAD (OpenAI server_vad fields)
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    # cascade's overlap
    serial: bool = False
    speculative: bool = True
    speculative_pause_ms: int = 200
    speculative_uncovered_ms: int = 200
    asr_pause_hint_ms: int = 64
    prefill_while_speaking: bool = True
    # semantic_vad: the end-of-turn model decides (None: server_vad's silence rule).
    semantic: SemanticRule | None = None
    barge_in_min_ms: int = 200
    min_speech_ms: int = 64
    playout_lead_ms: int = 300
    # Longest turn (server VAD): at this much audio the turn is ended as if the user paused.
    max_turn_ms: int = 60_000

    @property
    def priming_enabled(self) -> bool:
        """Step 1's primers: only where a reply will follow, never in the serial baseline."""
        return self.prefill_while_speaking and not self.serial and self.create_response

    @property
    def speculation_enabled(self) -> bool:
        longest = (self.silence_duration_ms if self.semantic is None
                   else self.semantic.max_wait_ms)
        return (self.speculative and not self.serial and self.create_response
                and self.speculative_pause_ms < longest)


@dataclass(frozen=True)
class StageDeadlines:
    """How long a turn waits on each stage (seconds). Defaults are sized for the CPU
    default under a few concurrent sessions; GPU deployments can cut them."""

    asr_open_s: float = 5.0  # open a streaming ASR session
    asr_finalize_s: float = 5.0  # final transcript after the endpoint
    asr_max_backlog_ms: int = 30_000  # audio queued for an ASR stage that is not reading
    llm_first_token_s: float = 15.0  # first token (or tool call) of a reply
    llm_stall_s: float = 10.0  # between two tokens
    tts_s: float = 10.0  # TTS owes audio for text it was given and produces none


_WORDS = re.compile(r"[a-z0-9']+")


def normalize_transcript(text: str) -> list[str]:
    """Words only, lower case: punctuation and casing changes do not void a speculation."""
    return _WORDS.findall(text.lower())


def speculation_still_valid(speculative_text: str, final_text: str) -> bool:
    return normalize_transcript(speculative_text) == normalize_transcript(final_text)
