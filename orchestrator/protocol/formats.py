"""Audio format descriptors: GA objects (``{"type": "audio/pcm", "rate": 24000}``) and the
beta strings (``"pcm16"``, ``"g711_ulaw"``, ``"g711_alaw"``).

The GA object is the one representation inside cascade; beta strings are converted on the
way in (``format_from_beta``) and back on the way out for beta clients (``format_to_beta``).
``audio/pcm`` only exists at 24 kHz in the Realtime API, so ``rate`` is a ``Literal``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from pydantic_core import PydanticCustomError

from orchestrator.protocol.base import CompactModel

BetaAudioFormat = Literal["pcm16", "g711_ulaw", "g711_alaw"]


class AudioPCM(CompactModel):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[24000] = 24000


class AudioPCMU(CompactModel):
    type: Literal["audio/pcmu"] = "audio/pcmu"


class AudioPCMA(CompactModel):
    type: Literal["audio/pcma"] = "audio/pcma"


AudioFormat = Annotated[AudioPCM | AudioPCMU | AudioPCMA, Field(discriminator="type")]
AudioFormatType = Literal["audio/pcm", "audio/pcmu", "audio/pcma"]

_FROM_BETA: dict[str, dict[str, object]] = {
    "pcm16": {"type": "audio/pcm", "rate": 24000},
    "g711_ulaw": {"type": "audio/pcmu"},
    "g711_alaw": {"type": "audio/pcma"},
}
_TO_BETA: dict[str, BetaAudioFormat] = {
    "audio/pcm": "pcm16",
    "audio/pcmu": "g711_ulaw",
    "audio/pcma": "g711_alaw",
}


def format_from_beta(name: object, field: str) -> dict[str, object]:
    """The GA format object for a beta format string (``field`` names the beta field in
    the error for anything else)."""
    if isinstance(name, str) and name in _FROM_BETA:
        return dict(_FROM_BETA[name])
    raise PydanticCustomError(
        "beta_audio_format",
        "Invalid value {value}; supported values are 'pcm16', 'g711_ulaw', 'g711_alaw'",
        {"value": repr(name)[:60], "field": field},
    )


def format_to_beta(format_type: str) -> BetaAudioFormat:
    return _TO_BETA[format_type]
