"""duospec: lossless speculative decoding (speculative decoding, prompt lookup; SpecExec and DuoDecoding to come)."""

from duospec.api import GenerationInterrupted, GenerationResult, Pipeline, StreamChunk, load
from duospec.config import DuospecError, SamplingConfig

__all__ = ["load", "Pipeline", "GenerationResult", "GenerationInterrupted", "StreamChunk", "DuospecError", "SamplingConfig"]
__version__ = "0.1.0"
