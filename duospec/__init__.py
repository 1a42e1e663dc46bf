"""duospec: lossless speculative decoding on the hardware you have (speculative decoding, prompt lookup, suffix decoding, SpecExec, DuoDecoding, auto)."""

from duospec.api import GenerationInterrupted, GenerationResult, Pipeline, StreamChunk, load
from duospec.config import DuospecError, SamplingConfig

__all__ = ["load", "Pipeline", "GenerationResult", "GenerationInterrupted", "StreamChunk", "DuospecError", "SamplingConfig"]
__version__ = "0.1.0"
