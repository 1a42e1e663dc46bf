"""The models the library baselines run, found from what the pipeline loaded: its sources and load options.

transformers' `generate` needs transformers modules and llama-cpp-python's `Llama` a GGUF file. A
baseline gets them here, from the pipeline's sources through `models/loading.py`, never by reaching
into a duospec `Model`: where the pipeline's own target already is that transformers module (or that
GGUF file), the loader says so and it is shared instead of loaded twice.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from duospec.config import DuospecError
from duospec.models.loading import LoadOptions, gguf_file, load_model, transformers_module

if TYPE_CHECKING:
    from duospec.api import Pipeline


class BaselineModels:
    """One pipeline's baseline models, loaded on first use and kept for its later answers."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self._target: torch.nn.Module | None = None
        self._draft: torch.nn.Module | None = None

    def transformers_target(self) -> torch.nn.Module:
        """The target as a transformers module: the pipeline's own where it runs on transformers,
        else a transformers copy loaded from the same source."""
        pipe = self.pipe
        if self._target is None:
            self._target = transformers_module(pipe.target)
        if self._target is None:
            options = LoadOptions(backend="transformers", device=pipe.device, dtype=pipe.dtype, threads=pipe.threads)
            self._target = transformers_module(load_model(pipe.target_source, options, name=pipe.target_source, progress=pipe.progress).model)
        return self._target

    def plain_draft(self) -> torch.nn.Module:
        """The draft exactly as transformers loads it (same checkpoint and dtype, no int8 weights):
        what a user of the transformers library would pass as assistant."""
        pipe = self.pipe
        if pipe.draft_backend == "transformers" and pipe.draft_quantization == "none":
            return transformers_module(pipe.draft)  # the pipeline's own (read each time: attach_draft may replace it)
        if self._draft is None:
            options = replace(pipe.draft_load_options(quantization="none"), backend="transformers", device=pipe.device, dtype=pipe.dtype)
            self._draft = transformers_module(pipe.load_draft(options, name=pipe.draft_source).model)
        return self._draft

    def gguf_path(self) -> Path:
        """The target's GGUF file, or a DuospecError when it has none."""
        from duospec.models.loading import is_gguf_path
        from duospec.models.registry import EMBEDDED_MODELS, ensure_gguf

        pipe = self.pipe
        path = gguf_file(pipe.target)
        if path is not None:
            return path
        if pipe.target_source in EMBEDDED_MODELS:
            return ensure_gguf(EMBEDDED_MODELS[pipe.target_source], progress=pipe.progress)
        if is_gguf_path(pipe.target_source):
            return Path(pipe.target_source).expanduser()
        raise DuospecError(f"the target {pipe.target_source!r} is not a GGUF model (embedded name or .gguf file)")

    def has_gguf(self) -> bool:
        """Whether the target exists as a GGUF file, without building it."""
        from duospec.models.loading import has_gguf

        return gguf_file(self.pipe.target) is not None or has_gguf(self.pipe.target_source)


_BY_PIPELINE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def baseline_models(pipe: Pipeline) -> BaselineModels:
    """The pipeline's baseline models (one set per pipeline, gone with it)."""
    if pipe not in _BY_PIPELINE:
        _BY_PIPELINE[pipe] = BaselineModels(pipe)
    return _BY_PIPELINE[pipe]
