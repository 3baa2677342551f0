"""Voice activity detection (Silero, ONNX Runtime only): a library the orchestrator embeds."""

from stages.vad.model import SileroVadModel, default_model_path
from stages.vad.segmenter import SpeechEnd, SpeechStart, VadEvent, VadSegmenter
from stages.vad.stream import VadFrame, VadStream

__all__ = [
    "SileroVadModel",
    "SpeechEnd",
    "SpeechStart",
    "VadEvent",
    "VadFrame",
    "VadSegmenter",
    "VadStream",
    "default_model_path",
]
