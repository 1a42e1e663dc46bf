"""llama.cpp backend: a GGUF model driven through llama-cpp-python's low-level API, as the Model protocol.

Why the low-level API: the high-level `llama_cpp.Llama` keeps one sequence and cannot score a tree.
Here one `llama_decode` call scores a chain or a whole tree and returns logits for every token.

Trees without an attention mask: llama.cpp has no arbitrary mask, but its KV cache lets a cell belong
to several sequences, and a token attends to the cells of its (first) sequence at positions up to its
own. So every leaf of the tree gets its own sequence id (1, 2, ...), every node carries the ids of all
leaves below it, and each leaf's sequence also holds the committed prefix (sequence 0, copied by id,
not by data). A node then sees exactly the prefix, its ancestors and itself, with position = cached
length + depth, as llama.cpp's own speculative and parallel examples do. Several ids per token need a
unified KV cache (`kv_unified`); without it `llama_decode` refuses the batch.

Keeping a path: the accepted nodes all lie on the branch of one leaf s. Drop s's cells past the path,
keep only s's cells (`seq_keep`, which also strips every other id), then rename s to 0. The cache
holds the prefix plus the path, in order, and the cached length is checked after every round.

Lanes (continuous batching, `split_lanes`): the sequence ids and KV cells are split among several
requests. Each lane is a Model of its own: its committed prefix on its home id, its tree leaves on a
block of ids after it, its cells among the context's; every cache operation touches only the lane's
ids, so lanes never see or disturb each other. `run_passes` scores the pending forwards of several
lanes in one `llama_decode` (models/joint.py decides when). The model itself is the one lane that owns
every id (home 0, leaves 1..255).

Facts checked with llama-cpp-python 0.3.36: a batch larger than `n_batch` aborts the process (a C
assert), so inputs are cut into chunks first; the logits buffer is overwritten by the next decode, so
it is copied out at once; a log callback must stay referenced while llama.cpp may call it.
"""

from __future__ import annotations

import copy
import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from duospec.config import DuospecError
from duospec.models import prefix
from duospec.models.amx_probe import repack_allowed
from duospec.models.base import reduce_blocks, usable_cores
from duospec.models.joint import PassPreempted, lane_forward

INSTALL_HINT = (
    "the llama.cpp backend needs llama-cpp-python; install it with "
    "pip install -e \".[llamacpp]\" (it compiles llama.cpp, about 5 minutes on 2 cores), or use --backend transformers"
)
DEFAULT_CONTEXT = 4096  # KV cells allocated; the model's trained context caps it
DEFAULT_BATCH = 512  # tokens per llama_decode call (longer inputs are split)
DEFAULT_SEQUENCES = 256  # sequence ids (llama.cpp's maximum): a tree may have at most 255 leaves
MAX_SEQUENCE_IDS = 256  # llama.cpp's LLAMA_MAX_SEQ: sequence ids per context (a tree leaf takes one)


def import_llama_cpp():
    """The llama_cpp module, or a DuospecError that says how to install it."""
    try:
        import llama_cpp
    except ImportError as error:
        raise DuospecError(f"{INSTALL_HINT} ({error})") from error
    return llama_cpp


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


_backend_ready = False
_log_callback = None  # keeps the ctypes callback alive as long as llama.cpp may call it


def _init_backend(llama_cpp, verbose: bool) -> None:
    """Initialise llama.cpp once per process and silence its log unless asked for."""
    global _backend_ready, _log_callback
    if _backend_ready:
        return
    if not verbose:
        _log_callback = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _backend_ready = True


@dataclass(frozen=True)
class LlamaCppSettings:
    """How a GGUF model is run. threads=None means every core of this process's affinity."""

    context: int = DEFAULT_CONTEXT
    batch: int = DEFAULT_BATCH
    sequences: int = DEFAULT_SEQUENCES
    threads: int | None = None
    repack: bool = True  # llama.cpp's repacked CPU weight layouts ("extra buffer types"), faster kernels
    lanes: int = 1  # requests the cache serves at once (split_lanes sets it); each gets `context` cells

    def resolved_threads(self) -> int:
        return self.threads or usable_cores()


def check_gguf_file(path: Path) -> None:
    """Refuse a file that is not a GGUF before llama.cpp reads it (a bad file there is only a NULL)."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise DuospecError(f"cannot read the GGUF file {path}: {error.strerror}") from error
    if magic != b"GGUF":
        raise DuospecError(f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file")


class LlamaCppModel:
    """A GGUF model plus its llama.cpp context and KV cache. Satisfies `duospec.models.base.Model`."""

    def __init__(self, path: str | os.PathLike, settings: LlamaCppSettings = LlamaCppSettings(), *, name: str | None = None, verbose: bool = False) -> None:
        llama_cpp = import_llama_cpp()
        self._lib = llama_cpp
        self.path = Path(path)
        self.name = name or str(self.path)
        self.settings = settings
        self.device = torch.device("cpu")
        self.dtype = torch.float32  # logits come back in float32; weights keep the GGUF's types
        self.deterministic = False  # llama.cpp runs a multi-token pass with other kernels than a decode
        check_gguf_file(self.path)
        if not (2 <= settings.sequences <= MAX_SEQUENCE_IDS):
            raise DuospecError(f"llama.cpp sequences must be in 2..{MAX_SEQUENCE_IDS}, got {settings.sequences}")
        if not (1 <= settings.lanes <= settings.sequences // 2):
            raise DuospecError(f"llama.cpp lanes must be in 1..{settings.sequences // 2} (two sequence ids each), got {settings.lanes}")
        _init_backend(llama_cpp, verbose)

        model_params = llama_cpp.llama_model_default_params()
        # Repacked layouts include llama.cpp's AMX kernels, which some builds miscompile: probed once (amx_probe.py).
        model_params.use_extra_bufts = settings.repack and repack_allowed(llama_cpp, self.path)
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self._model:
            raise DuospecError(
                f"llama.cpp could not load {self.path}: the file is truncated or damaged, or its architecture is "
                "not supported by this llama.cpp build (rerun with verbose logging for details, or use --backend transformers)"
            )
        self.trained_context = int(llama_cpp.llama_model_n_ctx_train(self._model))
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        _open_context(self)
        self._cache_len = 0
        self._tree: _OpenTree | None = None  # the tokens since the last ordinary forward and their sequence ids
        self.held_prefix = None  # what a caller recorded the cache to hold (models/prefix.py); any cache change drops it
        # The sequence ids this Model uses: its committed prefix on `_home`, tree leaves on the `_leaf_ids`
        # ids after it. The model alone owns them all; a lane (split_lanes) a block of them.
        self._home, self._leaf_ids = 0, settings.sequences - 1
        self._engine = self  # the model whose llama.cpp context this Model's passes run in
        self._lanes_open = False
        self._siblings: list[LlamaCppModel] = []  # the other lanes of this cache (split_lanes), whose prefixes it may share
        self.joiner = None  # models/joint.py's JointPasses, for a lane whose passes join other lanes'
        self.joint_key = id(self)  # passes of equal keys share one llama_decode: the lanes of this context (copies keep it)
        self.last_batch: tuple[int, int] = (0, 0)  # tokens and lanes beside this lane's last forward (joint passes)

    def set_threads(self, threads: int) -> None:
        """Change the threads of later passes (the Duo engine gives the target fewer beside a draft)."""
        self._lib.llama_set_n_threads(self._ctx, threads, threads)
        self.threads = threads

    # -- the Model protocol -----------------------------------------------------------------------
    def set_deterministic(self, enabled: bool) -> None:
        """Deterministic mode cannot be kept here (a multi-token pass runs other kernels than a decode)."""
        if enabled:
            raise DuospecError("--deterministic needs the transformers backend; llama.cpp cannot keep it")

    @property
    def cache_len(self) -> int:
        return self._cache_len

    def reset(self) -> None:
        self.held_prefix = None
        if self._home == 0 and self._leaf_ids == self.settings.sequences - 1:
            self._lib.llama_memory_clear(self._memory, True)  # the model alone: every cell is its
        else:
            for sequence in range(self._home, self._home + 1 + self._leaf_ids):
                self._lib.llama_memory_seq_rm(self._memory, sequence, -1, -1)
        self._cache_len = 0
        self._tree = None

    @property
    def max_tree_leaves(self) -> int:
        """Leaves one open tree may have: a sequence id each (the home id holds the committed prefix)."""
        return self._leaf_ids

    def extend_fits(self, parents: list[int]) -> list[bool]:
        """Which of these candidate nodes (their parents index the open tree), taken in order, the
        next extend could hold before the sequence ids run out: a parent's first child inherits its
        id, any other node needs a fresh one."""
        if self._tree is None:
            return [False] * len(parents)
        return self._tree.fits(parents, self.tree_ids_left)

    @property
    def tree_ids_left(self) -> int:
        """New leaves the open tree may still get (extending it by more raises)."""
        used = 0 if self._tree is None else len(self._tree.used_ids())
        return self.max_tree_leaves - used

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        last_only: bool = False,
        extend_tree: bool = False,
        reduce=None,
    ) -> torch.Tensor:
        """Score `tokens` after the cache in one decode per n_batch tokens (with other lanes' pending
        passes when this lane has a joiner); see the module docstring."""
        return lane_forward(self, tokens, positions, tree_mask, last_only, extend_tree, reduce)

    def reopen_chain(self, start: int) -> None:
        """The open tree is the chain from `start` on (a prompt passed in chunks, as one pass leaves it)."""
        self._tree = _OpenTree(self, start, chain=self._cache_len - start)

    def interrupt(self, stop: bool = True) -> None:
        """Raise (stop=False: lower) the stop flag of this model's context: a decode running in it raises PassPreempted."""
        self._engine._stop_flag[0] = b"\1" if stop else b"\0"

    def prepare_forward(self, tokens, positions, tree_mask, last_only: bool, extend_tree: bool, reduce) -> "PreparedPass":
        """Everything of a forward but the decode: checks, positions, the tree's sequence ids."""
        if self._lanes_open:
            raise RuntimeError(f"{self.name}'s cache is split into lanes; run passes through a lane")
        self.held_prefix = None  # dropped first: a pass that fails halfway leaves no record
        if extend_tree:
            if self._tree is None or tree_mask is None or positions is None:
                raise ValueError("extend_tree needs an open tree (an earlier forward), explicit positions and a tree_mask")
        else:
            self._settle_tree()
        n_new = int(tokens.shape[0])
        start = self._cache_len
        if start + n_new > self.max_context:
            raise DuospecError(
                f"{self.name}: {start + n_new} tokens do not fit the llama.cpp context of {self.max_context}; "
                "shorten the prompt or raise the context size"
            )
        token_ids = tokens.detach().to("cpu", torch.int64).numpy().astype(np.int32)
        if positions is None:
            position_ids = np.arange(start, start + n_new, dtype=np.int32)
        else:
            position_ids = positions.detach().to("cpu").numpy().astype(np.int32)
        sequences: list[list[int]] | None = None
        if extend_tree:
            sequences = self._tree.extend(_parents_from_mask(tree_mask, self._tree.size), position_ids.tolist())
        elif tree_mask is not None and not _is_causal(tree_mask):
            self._tree = _OpenTree(self, start)
            sequences = self._tree.extend(_parents_from_mask(tree_mask, 0), position_ids.tolist())
        else:
            self._tree = _OpenTree(self, start, chain=n_new)  # a chain on the home id: keep crops
        return PreparedPass(self, token_ids, position_ids, sequences, start, last_only, reduce, extends_tree=extend_tree)

    def adopt_prefix(self, tokens, own: int) -> int:
        """Where another lane of this cache holds a longer prefix of `tokens` than this lane's `own`,
        share its cells (llama.cpp's seq_cp tags the same cells with this lane's id: no copy, no pass)
        and hold that prefix instead; returns its length, or 0 when no lane holds more. A lane that is
        mid-round holds no record (every forward drops it), so only committed cells are shared."""
        best, donor = prefix.longest_elsewhere(self, self._siblings, tokens, own)
        if donor is None:
            return 0
        self.reset()
        self._lib.llama_memory_seq_cp(self._memory, donor._home, self._home, 0, best)
        self._cache_len = best
        return best

    def finish_forward(self, prepared: "PreparedPass") -> torch.Tensor:
        """The logits (or reduced rows) of a pass `run_passes` ran; the cache now holds its tokens."""
        self._cache_len = prepared.start + len(prepared.token_ids)
        rows = [row for row in prepared.outputs if row.numel()]
        if not rows:
            return torch.empty(0, self.vocab_size)
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    def abandon_forward(self, prepared: "PreparedPass") -> None:
        """A pass that failed: drop whatever of it (and of the open tree it joined) reached the cache,
        so the model holds its committed prefix again."""
        start = self._tree.start if self._tree is not None else prepared.start
        for sequence in range(self._home + 1, self._home + 1 + self._leaf_ids):
            self._lib.llama_memory_seq_rm(self._memory, sequence, -1, -1)
        self._lib.llama_memory_seq_rm(self._memory, self._home, start, -1)
        self._cache_len, self._tree, self.held_prefix = start, None, None

    def keep(self, nodes: list[int]) -> None:
        self.held_prefix = None
        tree = self._tree
        start = tree.start if tree is not None else self._cache_len
        _check_path(nodes, self._cache_len - start, tree.parents if tree is not None else [])
        if tree is None or tree.is_chain:
            self.crop(start + len(nodes))
            return
        lib, memory, home = self._lib, self._memory, self._home
        end = start + len(nodes)
        leaf = tree.sequence[nodes[-1]] if nodes else home
        for sequence in tree.used_ids():  # only this lane's ids: other lanes' cells stay as they are
            if sequence != leaf:
                lib.llama_memory_seq_rm(memory, sequence, -1, -1)
        lib.llama_memory_seq_rm(memory, leaf, end, -1)
        if leaf != home:
            lib.llama_memory_seq_rm(memory, home, start, -1)
            lib.llama_memory_seq_cp(memory, leaf, home, -1, -1)
            lib.llama_memory_seq_rm(memory, leaf, -1, -1)
        self._tree = None
        self._cache_len = end

    def crop(self, length: int) -> None:
        self.held_prefix = None
        self._settle_tree()
        if not (0 <= length <= self._cache_len):
            raise ValueError(f"cannot crop a cache of {self._cache_len} tokens to {length}")
        if length < self._cache_len:
            if not self._lib.llama_memory_seq_rm(self._memory, self._home, length, -1):
                raise DuospecError(f"{self.name}: llama.cpp cannot trim this model's cache (recurrent or sliding-window memory); use --backend transformers")
        self._cache_len = length

    def _settle_tree(self) -> None:
        """Drop a scored tree nobody kept a path of, so the cache is the prefix alone (the home id).

        A chain needs nothing: it is on the home id already, and crop trims it."""
        if self._tree is not None and not self._tree.is_chain:
            for sequence in self._tree.used_ids():
                self._lib.llama_memory_seq_rm(self._memory, sequence, -1, -1)
            self._lib.llama_memory_seq_rm(self._memory, self._home, self._tree.start, -1)  # a chain the tree grew from
            self._cache_len = self._tree.start
        self._tree = None

    def close(self) -> None:
        """Free llama.cpp's context, batch and weights (also done when the object is collected); a
        lane frees nothing (the model it came from owns them)."""
        lib = getattr(self, "_lib", None)
        if lib is None or getattr(self, "_engine", self) is not self:
            return
        if getattr(self, "_ctx", None):
            lib.llama_batch_free(self._batch)
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass


def end_of_generation_ids(model: LlamaCppModel) -> frozenset[int]:
    """The ids llama.cpp itself stops on (EOS, EOT and the model's other end-of-generation tokens)."""
    return frozenset(i for i in range(model.vocab_size) if model._lib.llama_vocab_is_eog(model._vocab, i))


def _open_context(model: LlamaCppModel) -> None:
    """Create the model's llama.cpp context (its KV cache: `context` cells per lane) and its batch."""
    llama_cpp, settings = model._lib, model.settings
    threads = settings.resolved_threads()
    context_params = llama_cpp.llama_context_default_params()
    per_lane = min(settings.context, model.trained_context) if model.trained_context > 0 else settings.context
    context_params.n_ctx = per_lane * settings.lanes
    context_params.n_batch = settings.batch
    context_params.n_ubatch = settings.batch
    context_params.n_seq_max = settings.sequences
    context_params.n_threads = threads
    context_params.n_threads_batch = threads
    context_params.kv_unified = True  # one token in several sequences (trees) needs a unified cache
    model._ctx = llama_cpp.llama_init_from_model(model._model, context_params)
    if not model._ctx:
        llama_cpp.llama_model_free(model._model)
        model._model = None
        raise DuospecError(f"llama.cpp could not create a context for {model.path} ({context_params.n_ctx} cells); try a smaller --ctx-size or --max-batch")
    model._memory = llama_cpp.llama_get_memory(model._ctx)
    _install_stop_flag(model)
    model.max_context = int(llama_cpp.llama_n_ctx(model._ctx)) // settings.lanes  # cells one lane (or the model alone) may use
    model.threads = threads
    model._batch_size = int(llama_cpp.llama_n_batch(model._ctx))
    model._batch = llama_cpp.llama_batch_init(model._batch_size, 0, settings.sequences)
    # numpy views of the batch's arrays: filling them costs one vectorised write per field.
    model._batch_tokens = np.ctypeslib.as_array(model._batch.token, shape=(model._batch_size,))
    model._batch_positions = np.ctypeslib.as_array(model._batch.pos, shape=(model._batch_size,))
    model._batch_n_seq = np.ctypeslib.as_array(model._batch.n_seq_id, shape=(model._batch_size,))
    model._batch_logits = np.ctypeslib.as_array(model._batch.logits, shape=(model._batch_size,))
    model._seq_rows = [np.ctypeslib.as_array(model._batch.seq_id[i], shape=(settings.sequences,)) for i in range(model._batch_size)]


def _install_stop_flag(model: LlamaCppModel) -> None:
    """Give the context a stop flag: llama.cpp calls its abort callback at every graph node, and the
    callback is libc's strlen over a two-byte buffer (b"\\0": go on, b"\\1": stop), so checking it
    takes no Python and no GIL (a Python callback would take the GIL hundreds of times per pass).
    models/joint.py raises it to stop a lone prompt chunk when a request joins (`interrupt`)."""
    model._stop_flag = ctypes.create_string_buffer(2)
    model._stop_callback = _flag_reader(model._lib)
    model._lib.llama_set_abort_callback(model._ctx, model._stop_callback, ctypes.cast(model._stop_flag, ctypes.c_void_p))


def _flag_reader(llama_cpp):
    """A ggml_abort_callback returning whether the byte its data points to is set: the C library's
    strlen on a one-byte string (0 or 1, so its low byte is the bool ggml reads: libc on Linux and
    macOS, msvcrt on Windows), or a Python function where neither is found."""
    for library in (lambda: ctypes.CDLL(None), lambda: ctypes.cdll.msvcrt):
        try:
            return ctypes.cast(library().strlen, llama_cpp.ggml_abort_callback)
        except (OSError, AttributeError, TypeError):
            continue
    return llama_cpp.ggml_abort_callback(lambda data: ctypes.cast(data, ctypes.POINTER(ctypes.c_char))[0] != b"\0")


def split_lanes(model: LlamaCppModel, count: int, share_prefixes: bool = True) -> list[LlamaCppModel]:
    """Split `model`'s cache into `count` lanes, each a Model of its own with `max_context` cells and
    an equal block of sequence ids. The context is created anew with `count` times the cells (the
    weights stay loaded, so measured pass costs stay valid). The model itself runs no pass afterwards
    (its ids are the lanes' now). share_prefixes: a lane may take a prefix another lane holds."""
    if not 1 <= count <= model.settings.sequences // 2:
        raise DuospecError(f"{model.name}: at most {model.settings.sequences // 2} lanes (two sequence ids each), got {count}")
    if count != model.settings.lanes:
        model._lib.llama_batch_free(model._batch)
        model._lib.llama_free(model._ctx)
        model._ctx = None
        model.settings = replace(model.settings, lanes=count)
        _open_context(model)
    model.reset()
    block = model.settings.sequences // count
    lanes = []
    for index in range(count):
        lane = copy.copy(model)  # shares the llama.cpp model, context, memory and batch
        lane.name = f"{model.name} [lane {index}]"
        lane._home, lane._leaf_ids = index * block, block - 1
        lane._cache_len, lane._tree, lane.held_prefix = 0, None, None
        lanes.append(lane)
    for lane in lanes:
        lane._siblings = lanes if share_prefixes else []  # adopt_prefix looks among these
    model._lanes_open = True
    return lanes


def _decode(engine: LlamaCppModel, token_ids: np.ndarray, position_ids: np.ndarray, sequence_rows: list[list[int]], wants: np.ndarray) -> np.ndarray:
    """One llama_decode of at most n_batch tokens; a view of the logits rows it wrote (valid until
    the next decode)."""
    n = len(token_ids)
    engine._batch.n_tokens = n
    engine._batch_tokens[:n] = token_ids
    engine._batch_positions[:n] = position_ids
    for i, row in enumerate(sequence_rows):
        engine._batch_n_seq[i] = len(row)
        engine._seq_rows[i][: len(row)] = row
    engine._batch_logits[:n] = wants
    status = engine._lib.llama_decode(engine._ctx, engine._batch)
    if status == 2 and engine._stop_flag.raw[0]:  # llama.cpp dropped the cells of the stopped decode
        raise PassPreempted(f"{engine.name}: a prompt chunk stopped for a request that joined")
    if status != 0:
        raise DuospecError(
            f"{engine.name}: llama_decode failed (code {status}: "
            + ("no room left in the KV cache" if status == 1 else "aborted" if status == 2 else "error")
            + "); raise the context size or shorten the input"
        )
    n_out = int(wants.sum())
    if n_out == 0:
        return np.empty((0, engine.vocab_size), dtype=np.float32)
    return np.ctypeslib.as_array(engine._lib.llama_get_logits(engine._ctx), shape=(n_out, engine.vocab_size))


@dataclass
class PreparedPass:
    """One Model's (lane's) forward, ready to decode: its tokens, positions and sequence ids."""

    model: LlamaCppModel
    token_ids: np.ndarray  # int32
    position_ids: np.ndarray  # int32
    sequences: list[list[int]] | None  # each token's ids; None: every token on the model's home id
    start: int  # the cache length before it
    last_only: bool
    reduce: Callable[[torch.Tensor], torch.Tensor] | None
    outputs: list[torch.Tensor] = field(default_factory=list)  # logits (or reduced) rows, per decode
    extends_tree: bool = False  # it grows the open tree (a SpecExec search level on the draft)
    preemptible: bool = False  # a joining request may stop it (a prompt chunk, a wide lone tree: models/joint.py)

    @property
    def joint_key(self) -> int:
        return self.model.joint_key

    @staticmethod
    def run_together(passes: list["PreparedPass"]) -> None:
        run_passes(passes)


def run_passes(passes: list[PreparedPass]) -> None:
    """Decode the passes of one llama.cpp context together, n_batch tokens per llama_decode, filling
    each pass's `outputs`. Each token carries its own lane's sequence ids and position, so a lane's
    tokens attend to its own cells only, exactly as when it runs alone."""
    engine = passes[0].model._engine
    tokens = np.concatenate([p.token_ids for p in passes])
    positions = np.concatenate([p.position_ids for p in passes])
    owner = np.repeat(np.arange(len(passes)), [len(p.token_ids) for p in passes])
    index_in_pass = np.concatenate([np.arange(len(p.token_ids)) for p in passes])
    wants = np.concatenate([_wanted_rows(p) for p in passes])
    for begin in range(0, len(tokens), engine._batch_size):
        end = min(len(tokens), begin + engine._batch_size)
        sequence_rows = [
            passes[k].sequences[i] if passes[k].sequences is not None else [passes[k].model._home]
            for k, i in zip(owner[begin:end].tolist(), index_in_pass[begin:end].tolist())
        ]
        view = _decode(engine, tokens[begin:end], positions[begin:end], sequence_rows, wants[begin:end])
        row = 0
        for k in np.unique(owner[begin:end][wants[begin:end]]).tolist():  # passes with rows here, in batch order
            count = int(wants[begin:end][owner[begin:end] == k].sum())
            passes[k].outputs.append(_rows(view, row, row + count, passes[k].reduce))
            row += count


def _wanted_rows(prepared: PreparedPass) -> np.ndarray:
    """Which of a pass's tokens need logits: all, or the last one alone."""
    wants = np.zeros(len(prepared.token_ids), dtype=bool)
    if prepared.last_only:
        wants[-1] = True
    else:
        wants[:] = True
    return wants


def _rows(view: np.ndarray, begin: int, end: int, reduce) -> torch.Tensor:
    """Rows [begin, end) of llama.cpp's logits buffer: reduced block by block straight from the buffer
    (no [n, V] copy of our own), or copied at once (the next decode overwrites the buffer)."""
    if reduce is not None:
        return reduce_blocks(lambda a, b: torch.from_numpy(view[begin + a : begin + b].copy()), end - begin, reduce)
    return torch.from_numpy(view[begin:end].copy())


def _is_causal(mask: torch.Tensor) -> bool:
    n = mask.shape[0]
    return bool(torch.equal(mask.to("cpu"), torch.ones(n, n, dtype=torch.bool).tril_()))


def _parents_from_mask(mask: torch.Tensor, cached: int) -> list[int]:
    """Each new node's parent in the open tree: its nearest earlier ancestor, -1 for a root.

    mask: [n, cached + n], columns are the open tree's cached tokens, then the new ones; the result
    indexes the open tree (cached tokens first). Example (cached 0): rows [1,0,0,0], [1,1,0,0],
    [1,0,1,0], [1,1,0,1] -> [-1, 0, 0, 1] (node 3's ancestors are 0 and 1; its parent is 1, not 0).
    """
    mask = mask.to("cpu", torch.bool)
    n, width = mask.shape
    if width != cached + n:
        raise ValueError(f"tree_mask must be [{n}, {cached + n}] (new tokens x open-tree tokens), got {tuple(mask.shape)}")
    earlier = torch.arange(width)[None, :] < (torch.arange(n) + cached)[:, None]
    ranks = (earlier & mask).long() * (torch.arange(width) + 1)  # 1-based index of each earlier ancestor, 0 elsewhere
    return (ranks.max(dim=1).values - 1).tolist()


class _OpenTree:
    """Sequence ids of the open tree's cells: how a llama.cpp KV cache holds a tree grown over passes.

    A token attends to the cells of its first sequence id at positions up to its own. Invariant: for
    every node i, the cells carrying `sequence[i]` at positions <= pos(i) are exactly the committed
    prefix, i's ancestors and i. A new node either inherits its parent's id (the parent's first child:
    the parent was a leaf, so nothing deeper carries that id) or takes a fresh id, onto which the cells
    of its nearest cached ancestor's id up to that ancestor's position are copied (`seq_cp`, metadata
    only) and which its ancestors in the same batch also carry. So ids = leaves: at most
    the model's (or lane's) leaf ids; its home id stays the committed prefix. A chain forward stays on
    the home id.
    """

    def __init__(self, model: "LlamaCppModel", start: int, chain: int = 0) -> None:
        self.model = model
        self.start = start
        self.is_chain = chain > 0
        self.parents: list[int] = list(range(-1, chain - 1))
        self.sequence: list[int] = [model._home] * chain
        self.position: list[int] = list(range(start, start + chain))
        self.inheritable: list[bool] = [False] * chain  # the home id is never handed down (it is the prefix)
        self._first_id = model._home + 1
        self._next_id = self._first_id

    @property
    def size(self) -> int:
        return len(self.parents)

    def used_ids(self) -> range:
        """The leaf ids this tree has taken (its cells carry them)."""
        return range(self._first_id, self._next_id)

    def extend(self, parents: list[int], positions: list[int]) -> list[list[int]]:
        """Add nodes (parents index the open tree, -1 = hangs off the prefix); return each one's ids."""
        lib, memory = self.model._lib, self.model._memory
        first_new = self.size
        if not all(self.fits(parents, self.model.max_tree_leaves - len(self.used_ids()))):
            raise self._too_many_leaves()  # before any id or cell changes: a refused extend leaves the tree usable
        if self.is_chain:
            self.is_chain = False
        rows: list[list[int]] = []
        for parent, position in zip(parents, positions):
            if parent >= 0 and self.inheritable[parent]:
                sequence = self.sequence[parent]
                self.inheritable[parent] = False
            else:
                sequence = self._fresh_id()
                ancestor = parent
                while ancestor >= first_new:  # ancestors in this batch carry the new id too
                    rows[ancestor - first_new].append(sequence)
                    ancestor = self.parents[ancestor]
                lib.llama_memory_seq_rm(memory, sequence, -1, -1)
                if ancestor >= 0:
                    lib.llama_memory_seq_cp(memory, self.sequence[ancestor], sequence, -1, self.position[ancestor] + 1)
                else:
                    lib.llama_memory_seq_cp(memory, self.model._home, sequence, -1, self.start)
            rows.append([sequence])
            self.parents.append(parent)
            self.sequence.append(sequence)
            self.position.append(position)
            self.inheritable.append(True)
        return rows

    def fits(self, parents: list[int], ids_left: int) -> list[bool]:
        """Whether each new node, in order, could join with `ids_left` fresh ids: the rule `extend`
        applies (a parent's first child inherits its id; a parent in the same batch counts as new)."""
        inherited: set[int] = set()
        result = []
        for parent in parents:
            if parent >= 0 and parent not in inherited and (parent >= self.size or self.inheritable[parent]):
                inherited.add(parent)
                result.append(True)
            elif ids_left > 0:
                ids_left -= 1
                result.append(True)
            else:
                result.append(False)
        return result

    def _too_many_leaves(self) -> DuospecError:
        return DuospecError(
            f"{self.model.name}: this tree has more than {self.model.max_tree_leaves} leaves, and llama.cpp gives each "
            f"leaf a sequence id (at most {MAX_SEQUENCE_IDS} sequences, {self.model.settings.sequences} allocated); "
            "cap the tree's leaves (SpecExec does so by itself) or use --backend transformers"
        )

    def _fresh_id(self) -> int:
        if len(self.used_ids()) >= self.model.max_tree_leaves:
            raise self._too_many_leaves()
        self._next_id += 1
        return self._next_id - 1


def _check_path(nodes: list[int], n_last: int, parents: list[int]) -> None:
    """`nodes` must be a root-first path among the open tree's tokens (each the child of the one before)."""
    if not nodes:
        return
    if nodes[0] != 0 or any(not (0 <= node < n_last) for node in nodes):
        raise ValueError(f"keep needs a root-first path of node indices in 0..{n_last - 1}, got {nodes}")
    for previous, node in zip(nodes, nodes[1:]):
        expected_parent = parents[node]
        if expected_parent != previous:
            raise ValueError(f"keep needs a path: node {node} is not a child of node {previous} (got {nodes})")
