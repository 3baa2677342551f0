"""TTS speaks a sentence, streaming ASR transcribes it back word for word (within a
stated tolerance: one word in a sentence)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest

from stages.asr.engine import WhisperAsr
from stages.common.audio import ASR_RATE
from stages.common.text import normalize
from stages.tts.engine import PiperTts
from stages.tts.settings import TtsSettings
from tests.support.speech import near_word_errors

SENTENCES = (
    "Please turn on the lights in the kitchen.",
    "The meeting has been moved to Thursday afternoon.",
    "What time does the train to Boston leave tomorrow morning?",
)


@pytest.fixture(scope="module")
async def engines() -> AsyncIterator[tuple[PiperTts, WhisperAsr]]:
    # Piper adds random noise by default; without it synthesis is reproducible, so a
    # mistranscription is a real regression rather than an unlucky sample.
    tts = PiperTts(TtsSettings(noise_scale=0.0, noise_w_scale=0.0))
    asr = await WhisperAsr.load()
    yield tts, asr
    await tts.aclose()
    await asr.aclose()


@pytest.mark.parametrize("sentence", SENTENCES)
async def test_tts_then_streaming_asr_round_trip(engines: tuple[PiperTts, WhisperAsr],
                                                 sentence: str) -> None:
    tts, asr = engines
    chunks = await tts.synthesize(sentence, sample_rate=ASR_RATE)
    assert "".join(c.text for c in chunks) == sentence
    audio = b"".join(c.audio for c in chunks) + bytes(int(0.5 * ASR_RATE) * 2)

    stream = await asr.open_stream()
    frame = ASR_RATE // 10 * 2  # 100 ms
    for i in range(0, len(audio), frame):
        await stream.push(audio[i:i + frame])
    final = await stream.finalize()
    await stream.aclose()

    # Word for word, within a stated tolerance: at most one of the 8-10 words heard as
    # another word, and a word heard with another ending ("lights"/"light") counts as
    # right. Synthesis is reproducible, but streaming decodes windows that depend on
    # timing (a loaded CPU decodes less often), and Whisper's int8 kernels differ by CPU.
    assert near_word_errors(sentence, final.text) <= 1, final.text
    # The word list is the text, word by word, in time order (no model tolerance needed).
    heard = [w for word in final.words for w in normalize(word.word)]
    assert heard == normalize(final.text)
    assert all(a.start <= b.start for a, b in itertools.pairwise(final.words))
    assert all(w.start <= w.end for w in final.words)
