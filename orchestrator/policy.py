"""The overlap policy: when each stage starts, what is held back, what barge-in cancels.

Read top-down, this is the whole timing behaviour of a turn in streaming mode:

1. Audio in.   Every client frame is resampled once to 16 kHz. The VAD scores it in
               process; from the first voiced frame (minus ``prefix_padding_ms``) the
               audio also streams into ASR, so transcription runs while the user speaks.
               Newly *stable* ASR text is sent as transcription deltas (it never retracts).
2. Pause.      When the VAD has heard ``speculative_pause_ms`` of silence inside a turn
               and the latest ASR hypothesis covers all the speech so far, the LLM starts
               on that text (a *speculative* reply, revision r) and its tokens already
               stream into TTS phrase by phrase. Nothing of it reaches the client yet.
3. Resume.     If the user speaks again before the endpoint, revision r is cancelled
               (LLM request aborted, TTS stream closed); step 2 may fire again later.
4. Endpoint.   After ``silence_duration_ms`` of silence the turn ends (speech_stopped).
               ASR finalizes — nearly free, since the last decode already covered the
               speech. If the final transcript equals the speculative text (after
               normalization), revision r is *released*: its buffered audio goes out at
               once. Otherwise r is cancelled and r+1 starts on the final text.
5. Reply out.  Released audio is paced at real time plus ``playout_lead_ms`` (see
               ``playout.py``); the LLM keeps generating and TTS keeps synthesizing ahead
               of playback.
6. Barge-in.   Voiced speech of at least ``barge_in_min_ms`` while a reply plays cancels
               LLM and TTS at that VAD decision, and the assistant item keeps only the
               words already played (TTS word timings x audio sent).

Control signals (speech_started/stopped, cancel, truncate) are never delayed or dropped
by an interruption; reply data (text deltas, audio) is what an interruption cancels.

``serial`` mode is the baseline: no speculation, and at the endpoint the full transcript,
then the full LLM reply, then the full synthesis, then sending.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


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
    barge_in_min_ms: int = 200
    min_speech_ms: int = 64
    playout_lead_ms: int = 300

    @property
    def speculation_enabled(self) -> bool:
        return (self.speculative and not self.serial and self.create_response
                and self.speculative_pause_ms < self.silence_duration_ms)


_WORDS = re.compile(r"[a-z0-9']+")


def normalize_transcript(text: str) -> list[str]:
    """Words only, lower case: punctuation and casing changes do not void a speculation."""
    return _WORDS.findall(text.lower())


def speculation_still_valid(speculative_text: str, final_text: str) -> bool:
    return normalize_transcript(speculative_text) == normalize_transcript(final_text)
