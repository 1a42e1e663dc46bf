"""transformers backend: any causal LM the transformers library loads, driven through the Model protocol.

Tree verification needs no custom kernel: a 4-D additive float mask (1, 1, n_new, n_past + n_new) with
explicit position ids works with `DynamicCache` under both `sdpa` and `eager` attention, and a tree pass
gives the same logits as running each root-to-leaf path on its own. Keeping an accepted tree path is an
index-select of each cache layer's keys and values along the sequence dimension.
"""

from __future__ import annotations

import inspect
import os
from itertools import pairwise
from pathlib import Path
from typing import Callable

import torch

from duospec.config import DuospecError
from duospec.models import deterministic
from duospec.models.base import LOGIT_BLOCK_ROWS, reduce_blocks
from duospec.models.deterministic import RowCheck, RowPlan, row_plan
from duospec.models.hf_cache import new_cache

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class HFModel:
    """A transformers causal LM plus its KV cache. Satisfies `duospec.models.base.Model`."""

    def __init__(self, model: torch.nn.Module, name: str = "model", deterministic: bool = False) -> None:
        self.model = model.eval()
        self.name = name
        self.device = model.device
        self.dtype = model.dtype
        head = model.get_output_embeddings()
        self.vocab_size = int(getattr(head, "out_features", None) or head.weight.shape[0])
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self._mask_min = torch.finfo(self.dtype).min
        self.cache = new_cache(model.config, name)
        self._cache_len = 0
        self._tree_start = 0  # cache length before the open tree (the last forward, or those it extended): `keep` indexes from here
        self.held_prefix = None  # what a caller recorded the cache to hold (models/prefix.py); any cache change drops it
        self._cache_kwarg = cache_kwarg_name(model)
        self._decoder_cache_kwarg = cache_kwarg_name(model.get_decoder())
        # A head that is a plain projection (no soft-capping or scaling after it) can be applied to row
        # blocks of hidden states; otherwise reduced forwards take the model's own logits.
        config = model.config
        self._plain_head = not getattr(config, "final_logit_softcapping", None) and getattr(config, "logit_scale", None) in (None, 1, 1.0)
        self._default_attention = config._attn_implementation
        self._row_check: RowCheck | None = None  # deterministic mode: row counts whose linear kernels were checked
        self.deterministic = False
        if deterministic:
            self.set_deterministic(True)

    def set_deterministic(self, enabled: bool) -> None:
        """Deterministic mode (models/deterministic.py): every logit row bit-identical to a one-token
        decode of its prefix. Turning it on checks this machine first and raises DuospecError where the
        hardware cannot keep it; turning it off restores the attention the model was loaded with."""
        if enabled == self.deterministic:
            return
        self.held_prefix = None  # cells computed in the other mode must not serve this one
        if not enabled:
            self.model.set_attn_implementation(self._default_attention)
            self.deterministic = False
            return
        deterministic.refuse_unsupported(self.model, self.device)
        deterministic.register()
        self.model.set_attn_implementation(deterministic.ROWWISE_ATTENTION)
        self.deterministic = True
        if self._row_check is not None:  # checked when first turned on
            return
        try:
            self._row_check = deterministic.RowCheck(self.model)
            for rows in deterministic.ROWS_CHECKED_AT_LOAD:
                self._row_check.check(rows)
            deterministic.probe(self)
        except BaseException:
            self._row_check = None
            self.set_deterministic(False)
            raise

    max_tree_leaves: int | None = None  # any tree shape: the 4-D mask has no leaf limit
    tree_ids_left: int | None = None

    def extend_fits(self, parents: list[int]) -> list[bool]:
        """Every node fits an open tree here (no sequence ids to run out of)."""
        return [True] * len(parents)

    @property
    def cache_len(self) -> int:
        return self._cache_len

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def set_threads(self, threads: int) -> None:
        """Change torch's CPU threads (process-wide: the Duo engine gives the target fewer beside a draft)."""
        torch.set_num_threads(threads)

    def reset(self) -> None:
        self.held_prefix = None
        self.cache = new_cache(self.model.config, self.name)
        self._cache_len = 0
        self._tree_start = 0

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        last_only: bool = False,
        extend_tree: bool = False,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        self.held_prefix = None  # dropped first: a pass that fails halfway leaves no record
        n_new = tokens.shape[0]
        start = self._cache_len
        tree_start = self._tree_start if extend_tree else start
        if extend_tree and (tree_mask is None or positions is None):
            raise ValueError("extend_tree needs explicit positions and a tree_mask over the open tree's tokens and the new ones")
        if positions is None:
            positions = torch.arange(start, start + n_new, device=self.device)
        attention_mask = None
        plan = None
        if self.deterministic:
            # Row-wise attention reads each row's keys from the plan; no 4-D mask is built. Every row
            # count a pass uses has its linear kernels checked once (deterministic.RowCheck).
            if tree_mask is not None and tuple(tree_mask.shape) != (n_new, start - tree_start + n_new):
                raise ValueError(f"tree_mask must be [{n_new}, {start - tree_start + n_new}] (new tokens x open-tree tokens), got {tuple(tree_mask.shape)}")
            plan = RowPlan(row_plan(start, tree_start, tree_mask), self.device)
            # The prompt's pass too: the mode's output is what one-token decoding of every token gives.
            self._row_check.check(n_new)
            if reduce is not None and self._plain_head:
                for rows in {min(LOGIT_BLOCK_ROWS, n_new), n_new % LOGIT_BLOCK_ROWS or 1}:
                    self._row_check.check(rows)
        elif tree_mask is not None:
            if tuple(tree_mask.shape) != (n_new, start - tree_start + n_new):
                raise ValueError(f"tree_mask must be [{n_new}, {start - tree_start + n_new}] (new tokens x open-tree tokens), got {tuple(tree_mask.shape)}")
            # Every new token sees the committed prefix and, among the open tree's tokens, its ancestors.
            attention_mask = torch.zeros(1, 1, n_new, start + n_new, dtype=self.dtype, device=self.device)
            attention_mask[0, 0, :, tree_start:].masked_fill_(~tree_mask.to(self.device), self._mask_min)
        inputs = {"input_ids": tokens.to(self.device)[None], "position_ids": positions.to(self.device)[None], "attention_mask": attention_mask, "use_cache": True}
        if plan is not None:
            with plan:
                result = self._run(inputs, n_new, last_only, reduce)
        else:
            result = self._run(inputs, n_new, last_only, reduce)
        self._tree_start = tree_start
        self._cache_len = start + n_new
        return result

    def _run(self, inputs: dict, n_new: int, last_only: bool, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        if reduce is not None and self._plain_head:
            # Hidden states once, then the vocabulary projection block by block: never [n, V] at once.
            decoder = self.model.get_decoder()
            hidden = decoder(**inputs, **{self._decoder_cache_kwarg: self.cache}).last_hidden_state[0]
            head = self.model.get_output_embeddings()
            result = reduce_blocks(lambda begin, end: head(hidden[begin:end]).float(), n_new, reduce)
        else:
            out = self.model(**inputs, **{self._cache_kwarg: self.cache}, logits_to_keep=1 if last_only else 0)
            logits = out.logits[0]
            result = logits.float() if reduce is None else reduce_blocks(lambda begin, end: logits[begin:end].float(), logits.shape[0], reduce)
        return result

    @torch.inference_mode()  # the cache tensors are inference tensors: in-place writes must happen in this mode
    def keep(self, nodes: list[int]) -> None:
        self.held_prefix = None
        start = self._tree_start
        check_keep_path(nodes, self._cache_len - start)
        nodes = list(nodes)
        if nodes == list(range(len(nodes))):
            self.crop(start + len(nodes))  # a chain prefix: cropping is enough
            return
        index = torch.tensor(nodes, device=self.device) + start
        for layer in self.cache.layers:
            # The right-hand side is gathered into a new tensor first, so the overlapping write is safe.
            layer.keys[:, :, start : start + len(nodes)] = layer.keys.index_select(2, index)
            layer.values[:, :, start : start + len(nodes)] = layer.values.index_select(2, index)
        self.crop(start + len(nodes))

    def crop(self, length: int) -> None:
        self.held_prefix = None
        if not (0 <= length <= self._cache_len):
            raise ValueError(f"cannot crop a cache of {self._cache_len} tokens to {length}")
        if length < self._cache_len:
            self.cache.crop(length - self._cache_len)  # transformers 5 takes minus the tokens to remove
        self._cache_len = length


def cache_kwarg_name(model: torch.nn.Module) -> str:
    """The keyword under which this model's `forward` takes the KV cache: "cache" or "past_key_values".

    transformers 5.24 renamed `past_key_values` to `cache` in the models' forward signatures; the old
    name still works there but warns (FutureWarning, "will be removed in version 5.40.0") on every call.
    transformers 5.20-5.23 (which pyproject also allows) only know `past_key_values`, and their forward
    takes `**kwargs`, so passing `cache=` there would be swallowed silently and decoding would run
    without a cache. Hence the name is read from the signature once, at construction: "cache" when the
    forward declares it, else the old name (older releases, and remote-code models not yet migrated).
    """
    try:
        parameters = inspect.signature(model.forward).parameters  # follows the decorators' __wrapped__
    except (TypeError, ValueError):  # a forward whose signature cannot be read: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def check_keep_path(nodes: list[int], available: int) -> None:
    """Refuse anything but a root-first, strictly increasing path of indices in [0, available).

    `available` is the number of the last forward's tokens still in the cache. The gather in `keep`
    would otherwise silently keep the wrong keys and values (a path out of order or missing its root),
    duplicate a token, or fail deep inside torch (an index past the end).
    """
    if not isinstance(nodes, (list, tuple)) or not nodes:
        raise ValueError(f"keep needs a non-empty list of node indices, root (0) first; got {nodes!r}")
    if not all(isinstance(node, int) and not isinstance(node, bool) for node in nodes):
        raise ValueError(f"keep needs integer node indices; got {nodes!r}")
    if nodes[0] != 0:
        raise ValueError(f"keep needs a root-first path: the first node must be 0, got {nodes!r}")
    if any(later <= earlier for earlier, later in pairwise(nodes)):
        raise ValueError(f"keep needs a strictly increasing path (no repeats, parents before children); got {nodes!r}")
    if available <= 0:
        raise ValueError(f"keep({nodes!r}) has nothing to index: no tokens of a last forward are in the cache")
    if nodes[-1] >= available:
        raise ValueError(
            f"keep got node {nodes[-1]}, but the last forward left only {available} token(s) in the cache "
            f"(valid indices 0..{available - 1}); got {nodes!r}"
        )


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise DuospecError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Default to CUDA when present, else CPU; refuse a CUDA device that is not there."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise DuospecError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DuospecError(f"device {device} was asked for but this machine has no CUDA GPU; use --device cpu")
    return device


def load_hf(
    path_or_id: str | os.PathLike,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    name: str | None = None,
    gguf_file: str | None = None,
):
    """Load a transformers checkpoint (local directory or hub id) and its tokenizer.

    gguf_file: a GGUF file inside the directory `path_or_id`, de-quantised by transformers on load.

    Returns (HFModel, tokenizer). Raises DuospecError when nothing loadable is found.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(path_or_id)
    if Path(source).expanduser().exists():
        source = str(Path(source).expanduser())
        if gguf_file is None and not (Path(source) / "config.json").exists():
            raise DuospecError(f"{source} is a path but holds no config.json; point at a transformers checkpoint directory")
    try:
        gguf = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(source, **gguf)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation, **gguf)
    except OSError as error:
        if Path(source).exists():  # a local checkpoint whose files cannot be used (a damaged config.json, ...)
            raise DuospecError(
                f"could not load the checkpoint in {source!r}: {error} If its files are damaged or incomplete, download "
                "or convert it again (for the embedded models, delete its folder under the duospec cache)."
            ) from error
        raise DuospecError(
            f"could not load model {source!r}: it is neither a local transformers checkpoint nor a hub id "
            f"that can be downloaded here (this machine may be offline). Details: {error}"
        ) from error
    except ImportError as error:
        raise DuospecError(f"loading {source!r} needs a package that is not installed: {error}") from error
    except Exception as error:  # safetensors, JSON and config errors: files that cannot be used as they are
        raise DuospecError(
            f"could not load model {source!r} ({type(error).__name__}: {error}). If its files are damaged or "
            "incomplete, download or convert it again (for the embedded models, delete its folder under the "
            "duospec cache); if its architecture is not supported by this transformers version, upgrade it."
        ) from error
    try:
        model.to(device)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
        raise DuospecError(f"could not move {source!r} to {device}: {error}. Try another --device or --dtype.") from error
    return HFModel(model, name=name or source), tokenizer
