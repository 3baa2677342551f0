"""The call's outbound track and the per-response playout on it: exact positions, the
output_audio_buffer events, clearing, pacing; and the inbound downmix."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
from av import AudioFrame

from orchestrator.protocol.server_events import ServerEventBase
from orchestrator.webrtc.media import (
    FRAME_BYTES,
    FRAME_SAMPLES,
    RATE,
    CallMedia,
    OutboundAudio,
    TrackPlayout,
    downmix,
)
from stages.tts.types import TtsChunk, TtsWord


class StepClock:
    """Advances 20 ms per reading: recv() never sleeps, each call is the next frame."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += FRAME_SAMPLES / RATE
        return self.t


def chunk(samples: int, index: int = 0, value: int = 1000, text: str = "x ") -> TtsChunk:
    audio = np.full(samples, value, dtype="<i2").tobytes()
    return TtsChunk(index=index, text=text, text_offset=0, audio=audio, sample_rate=RATE,
                    duration_ms=samples * 1000 / RATE)


async def frames(track: OutboundAudio, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        frame = await track.recv()
        out.append(bytes(frame.planes[0])[:FRAME_BYTES])
    return out


@pytest.mark.parametrize("seed", range(40))
async def test_stopped_once_the_last_sample_left(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [rng.randint(500, 100_000) for _ in range(rng.randint(1, 6))]
    events: list[str] = []
    track = OutboundAudio(clock=StepClock())
    playout = TrackPlayout(track, "resp_1", lambda e: events.append(e.type), lead_ms=1e9)
    for i, size in enumerate(sizes):
        await playout.send(chunk(size, i), lambda _b: None)  # type: ignore[arg-type,return-value]
    playout.finish()
    total_frames = -(-sum(sizes) // FRAME_SAMPLES)
    await frames(track, total_frames - 1)
    assert events == ["output_audio_buffer.started"]  # the last frame has not left yet
    await frames(track, 1)
    assert events == ["output_audio_buffer.started", "output_audio_buffer.stopped"]
    assert playout.played_ms() * RATE / 1000 == pytest.approx(sum(sizes), abs=1e-6)
    assert playout.queued_ms() == 0
    await frames(track, 3)  # silence afterwards; nothing more announced
    assert len(events) == 2


async def test_clear_drops_the_queue_and_freezes_the_position() -> None:
    events: list[ServerEventBase] = []
    track = OutboundAudio(clock=StepClock())
    media = CallMedia(track, lead_ms=1e9)
    playout = media.playout("resp_1", events.append)
    words = [TtsWord(text="hello", start_ms=0, end_ms=300), TtsWord(text="world", start_ms=300,
                                                                       end_ms=1000)]
    one_s = chunk(RATE, text="hello world").model_copy(update={"words": words})
    await playout.send(one_s, lambda _b: None)  # type: ignore[arg-type,return-value]
    sent = await frames(track, 20)  # 400 ms played
    assert all(any(f) for f in sent)
    assert playout.played_ms() == pytest.approx(400.0)
    assert media.clear() is True
    assert [e.type for e in events] == ["output_audio_buffer.started",
                                        "output_audio_buffer.cleared"]
    assert playout.played_ms() == pytest.approx(400.0) == pytest.approx(playout.sent_ms)
    assert playout.heard_text() == "hello"  # the word that ended by 400 ms
    after = await frames(track, 5)
    assert not any(any(f) for f in after)  # silence: nothing queued was played
    assert media.clear() is False  # nothing left to clear
    playout.finish()
    assert len(events) == 2  # no "stopped" after "cleared"


async def test_a_new_response_clears_the_previous_one() -> None:
    events: list[str] = []
    track = OutboundAudio(clock=StepClock())
    media = CallMedia(track, lead_ms=1e9)
    first = media.playout("resp_1", lambda e: events.append(e.type))
    await first.send(chunk(RATE, value=500), lambda _b: None)  # type: ignore[arg-type,return-value]
    await frames(track, 2)
    second = media.playout("resp_2", lambda e: events.append(e.type))
    await second.send(chunk(960, value=-7), lambda _b: None)  # type: ignore[arg-type,return-value]
    (frame,) = await frames(track, 1)
    assert np.frombuffer(frame, "<i2")[0] == -7  # the new reply, not the rest of the old
    assert events[:2] == ["output_audio_buffer.started", "output_audio_buffer.cleared"]


async def test_send_keeps_at_most_lead_ms_queued() -> None:
    track = OutboundAudio(clock=StepClock())
    waits: list[float] = []

    async def sleep(seconds: float) -> None:  # the track plays while the sender waits
        waits.append(seconds)
        await frames(track, max(1, round(seconds * 50)))

    playout = TrackPlayout(track, "resp_1", lambda _e: None, lead_ms=300, sleep=sleep)
    await playout.send(chunk(2 * RATE), lambda _b: None)  # type: ignore[arg-type,return-value]
    assert waits and track.queued_ms <= 300 + 100  # at most the lead plus one slice
    assert playout.sent_ms == pytest.approx(2000.0)


def test_downmix_stereo_and_mono() -> None:
    stereo = AudioFrame(format="s16", layout="stereo", samples=4)
    stereo.planes[0].update(np.array([100, 300, -50, -150, 0, 2, 7, 7], "<i2").tobytes())
    stereo.sample_rate = RATE
    stereo.time_base = Fraction(1, RATE)
    assert downmix(stereo).tolist() == [200, -100, 1, 7]
    mono = AudioFrame(format="s16", layout="mono", samples=3)
    mono.planes[0].update(np.array([1, -2, 3], "<i2").tobytes())
    assert downmix(mono).tolist() == [1, -2, 3]
