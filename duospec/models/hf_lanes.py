"""Continuous batching on the transformers backend: lanes of one KV cache whose passes run as one.

One cache (batch dimension 1, hf_cache.py's GrowingLayers) holds every lane's cells in the order they
were written, and each lane owns the list of cell indices that make its sequence (strictly
increasing). A joint pass concatenates the lanes' new tokens into one sequence, each token at its
lane's own position, under a 4-D additive mask: a token sees its lane's committed cells and, within
its lane's open tree, its ancestors; the mask the lone HFModel builds for a tree pass, spread over the
shared cells. So `keep` and `crop` only rewrite a lane's index list (no copy), a lane may adopt the
prefix another lane holds by sharing its cells (`adopt_prefix`), and cells that no lane holds any more
are garbage, dropped by one gather per layer once they outnumber the live ones (`compact`).

Why not a padded batch (one cache row per request): rows of different lengths need padding, and a
row's keep after a tree pass or its crop after a rejection would repack the whole cache every round.
The price of the shared sequence is attention over the other lanes' (masked) cells, small beside the
weights' matrix products at the contexts a CPU serves, and bounded by compaction.

A prompt chunk stops between decoder layers when a request joins (`interrupt`: a pre-hook on every
decoder layer reads the flag), and the layers that had already appended its keys drop them.
Deterministic mode (one-token-exact rows) is not kept under batching: a lane refuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from duospec.config import DuospecError
from duospec.models import prefix
from duospec.models.base import reduce_blocks
from duospec.models.hf import HFModel, check_keep_path
from duospec.models.hf_cache import new_cache
from duospec.models.joint import PassPreempted, lane_forward

MIN_GARBAGE = 256  # cells: below this many dropped cells, compaction is not worth a gather of the cache
CHECK_EVERY = 64  # cells written between two looks at the garbage (a look unions every lane's cells)


class SharedCache:
    """The cache every lane of one model writes into, and which of its cells are live."""

    def __init__(self, model: HFModel) -> None:
        self.model = model
        self.cache = new_cache(model.model.config, model.name)
        self.lanes: list[HFLane] = []
        self.stop = False  # a joining request asks the prompt chunk in flight to stop
        self.stoppable = False  # the pass in flight is made of prompt chunks only
        self.compactions = 0
        self._check_at = MIN_GARBAGE  # the cell count at which compact_if_wasteful next looks
        for handle in getattr(model, "_lane_hooks", []):  # a model split before: its old cache's hooks go
            handle.remove()
        model._lane_hooks = [layer.register_forward_pre_hook(self._stop_here) for layer in _decoder_layers(model.model)]

    def _stop_here(self, module, args) -> None:
        if self.stop and self.stoppable:
            raise PassPreempted(f"{self.model.name}: a prompt chunk stopped for a request that joined")

    @property
    def total(self) -> int:
        """Cells written, live or not."""
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def truncate(self, length: int) -> None:
        """Drop every cell from `length` on, in every layer (a pass that failed or stopped halfway has
        appended to some layers and not to others)."""
        for layer in self.cache.layers:
            written = layer.get_seq_length()
            if written > length:
                layer.crop(length - written)

    def live_cells(self) -> list[int]:
        return sorted(set().union(*(lane.cells for lane in self.lanes)))

    def compact_if_wasteful(self) -> None:
        """Compact when dropped cells outnumber live ones (and MIN_GARBAGE): attention and memory then
        stay within about twice what the lanes hold. Looks every CHECK_EVERY cells written, not every pass."""
        if self.total < self._check_at:
            return
        live = self.live_cells()
        if self.total - len(live) > max(len(live), MIN_GARBAGE):
            self.compact(live)
        self._check_at = self.total + CHECK_EVERY

    @torch.inference_mode()
    def compact(self, live: list[int]) -> None:
        """Move the live cells to the front, in order, and renumber every lane's cells."""
        index = torch.tensor(live, dtype=torch.long, device=self.model.device)
        for layer in self.cache.layers:
            if not layer.is_initialized:
                continue
            # The gathered right-hand sides are new tensors, so the overlapping writes are safe.
            layer._key_buffer[:, :, : len(live)] = layer.keys.index_select(2, index)
            layer._value_buffer[:, :, : len(live)] = layer.values.index_select(2, index)
            layer.crop(len(live) - layer.get_seq_length())
        renumber = {old: new for new, old in enumerate(live)}
        for lane in self.lanes:
            lane.cells = [renumber[cell] for cell in lane.cells]
        self.compactions += 1


class HFLane:
    """One request's share of a SharedCache: a Model (models/base.py) whose cache is its cell list."""

    max_tree_leaves: int | None = None  # the 4-D mask has no leaf limit
    tree_ids_left: int | None = None
    deterministic = False

    def __init__(self, shared: SharedCache, index: int) -> None:
        model = shared.model
        self.shared = shared
        self.name = f"{model.name} [lane {index}]"
        self.device, self.dtype, self.vocab_size, self.max_context = model.device, model.dtype, model.vocab_size, model.max_context
        self.cells: list[int] = []  # this lane's sequence: indices into the shared cache, increasing
        self._tree_start = 0  # cells[:_tree_start] is the committed prefix before the open tree
        self.held_prefix = None
        self.joiner = None  # models/joint.py's JointPasses
        self.last_batch: tuple[int, int] = (0, 0)  # tokens and lanes beside this lane's last forward
        self._siblings: list[HFLane] = []

    @property
    def joint_key(self) -> int:
        """What its passes run together with: those of the lanes of the same shared cache."""
        return id(self.shared)

    def set_deterministic(self, enabled: bool) -> None:
        if enabled:
            raise DuospecError(f"{self.name}: deterministic mode serves one request at a time; serve it with --max-batch 1")

    @property
    def cache_len(self) -> int:
        return len(self.cells)

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def set_threads(self, threads: int) -> None:
        torch.set_num_threads(threads)

    def extend_fits(self, parents: list[int]) -> list[bool]:
        return [True] * len(parents)

    def reset(self) -> None:
        self.cells, self._tree_start, self.held_prefix = [], 0, None

    def forward(self, tokens: torch.Tensor, positions=None, tree_mask=None, last_only: bool = False, extend_tree: bool = False, reduce=None) -> torch.Tensor:
        """Score `tokens` after this lane's cells: with other lanes' pending passes when it has a
        joiner (a prompt cut into chunks), else alone."""
        return lane_forward(self, tokens, positions, tree_mask, last_only, extend_tree, reduce)

    def reopen_chain(self, start: int) -> None:
        """The open tree is the chain from `start` on (a prompt passed in chunks, as one pass leaves it)."""
        self._tree_start = start

    def interrupt(self, stop: bool = True) -> None:
        """Raise (stop=False: lower) the flag that stops a prompt chunk in flight between layers."""
        self.shared.stop = stop

    def prepare_forward(self, tokens, positions, tree_mask, last_only: bool, extend_tree: bool, reduce) -> LanePass:
        """Everything of a forward but the pass: checks, positions, the open tree it joins."""
        self.held_prefix = None  # dropped first: a pass that fails halfway leaves no record
        n_new = int(tokens.shape[0])
        start = len(self.cells)
        if extend_tree and (tree_mask is None or positions is None):
            raise ValueError("extend_tree needs explicit positions and a tree_mask over the open tree's tokens and the new ones")
        tree_start = self._tree_start if extend_tree else start
        if self.max_context is not None and start + n_new > self.max_context:
            raise DuospecError(f"{self.name}: {start + n_new} tokens do not fit the model's context of {self.max_context}; shorten the prompt")
        if tree_mask is not None and tuple(tree_mask.shape) != (n_new, start - tree_start + n_new):
            raise ValueError(f"tree_mask must be [{n_new}, {start - tree_start + n_new}] (new tokens x open-tree tokens), got {tuple(tree_mask.shape)}")
        if positions is None:
            positions = torch.arange(start, start + n_new)
        mask = None if tree_mask is None else tree_mask.to("cpu", torch.bool)
        return LanePass(self, tokens.to("cpu", torch.long), positions.to("cpu", torch.long), mask, tree_start, last_only, reduce, extends_tree=extend_tree)

    def finish_forward(self, prepared: LanePass) -> torch.Tensor:
        """The logits (or reduced rows) of a pass that ran; the lane now holds its cells."""
        self.cells = self.cells + prepared.new_cells
        self._tree_start = prepared.tree_start
        return prepared.output

    def abandon_forward(self, prepared: LanePass) -> None:
        """A pass that failed or stopped: the lane holds its committed prefix again (what the pass
        wrote into the shared cache was dropped by run_lane_passes)."""
        self.cells = self.cells[: prepared.tree_start]  # the open tree it extended goes too
        self._tree_start, self.held_prefix = len(self.cells), None

    def keep(self, nodes: list[int]) -> None:
        self.held_prefix = None
        start = self._tree_start
        check_keep_path(nodes, len(self.cells) - start)
        self.cells = self.cells[:start] + [self.cells[start + node] for node in nodes]

    def crop(self, length: int) -> None:
        self.held_prefix = None
        if not (0 <= length <= len(self.cells)):
            raise ValueError(f"cannot crop a cache of {len(self.cells)} tokens to {length}")
        self.cells = self.cells[:length]

    def adopt_prefix(self, tokens, own: int) -> int:
        """Where another lane holds a longer prefix of `tokens` than this lane's `own`, share its cells
        (no copy, no pass) and return that length; 0 when none holds more."""
        best, donor = prefix.longest_elsewhere(self, self._siblings, tokens, own)
        if donor is None:
            return 0
        self.cells, self._tree_start, self.held_prefix = donor.cells[:best], best, None
        return best


@dataclass
class LanePass:
    """One lane's forward, ready to run beside others."""

    model: HFLane
    token_ids: torch.Tensor  # int64, on the CPU
    positions: torch.Tensor
    tree_mask: torch.Tensor | None  # bool [n, open-tree tokens + n]; None: a chain
    tree_start: int  # the lane's committed length before the open tree this pass joins
    last_only: bool
    reduce: Callable[[torch.Tensor], torch.Tensor] | None
    extends_tree: bool = False  # it grows the open tree (a SpecExec search level on the draft)
    new_cells: list[int] = field(default_factory=list)
    output: torch.Tensor | None = None
    preemptible: bool = False  # a joining request may stop it (a prompt chunk, a wide lone tree: models/joint.py)

    @property
    def joint_key(self) -> int:
        return self.model.joint_key

    @staticmethod
    def run_together(passes: list[LanePass]) -> None:
        run_lane_passes(passes)


@torch.inference_mode()
def run_lane_passes(passes: list[LanePass]) -> None:
    """Run the passes of one SharedCache as one forward of its model, filling each pass's new_cells
    and output. On failure (or a stop) nothing of the pass stays in the shared cache."""
    shared = passes[0].model.shared
    model = shared.model
    shared.compact_if_wasteful()
    total = shared.total
    sizes = [len(p.token_ids) for p in passes]
    ends = torch.tensor(sizes).cumsum(0).tolist()
    starts = [end - size for end, size in zip(ends, sizes)]
    lone = passes[0].model.cells
    if len(passes) == 1 and passes[0].tree_mask is None and len(lone) == total and (total == 0 or lone[-1] == total - 1):
        attention_mask = None  # one lane holding the whole cache, a chain: the plain causal pass
    else:
        attention_mask = _joint_mask(passes, starts, total, model)
    inputs = {
        "input_ids": torch.cat([p.token_ids for p in passes]).to(model.device)[None],
        "position_ids": torch.cat([p.positions for p in passes]).to(model.device)[None],
        "attention_mask": attention_mask,
        "use_cache": True,
    }
    shared.stoppable = all(p.preemptible for p in passes)
    try:
        rows_of = _logits_source(model, inputs, shared.cache)
    except BaseException:
        shared.truncate(total)
        raise
    finally:
        shared.stoppable = False
    wanted = [range(end - 1 if p.last_only else begin, end) for p, begin, end in zip(passes, starts, ends)]
    # The rows of every pass that wants plain logits go through the head at once: the head's weights
    # (a sixth of a 1.5B model's) are then read once per joint pass, not once per lane.
    plain = [rows for p, rows in zip(passes, wanted) if p.reduce is None]
    logits = rows_of(torch.tensor([row for rows in plain for row in rows], dtype=torch.long)) if plain else None
    taken = 0
    for prepared, begin, end, rows in zip(passes, starts, ends, wanted):
        prepared.new_cells = list(range(total + begin, total + end))
        if prepared.reduce is None:
            prepared.output, taken = logits[taken : taken + len(rows)], taken + len(rows)
        else:
            prepared.output = reduce_blocks(lambda a, b, first=rows.start: rows_of(torch.arange(first + a, first + b)), len(rows), prepared.reduce)


def _joint_mask(passes: list[LanePass], starts: list[int], total: int, model: HFModel) -> torch.Tensor:
    """The additive mask [1, 1, N, total + N]: each pass's rows see its lane's committed cells, and
    within its open tree (the cells since tree_start and its own new ones) what its tree_mask allows."""
    n_all = sum(len(p.token_ids) for p in passes)
    mask = torch.full((n_all, total + n_all), model._mask_min, dtype=model.dtype)
    for prepared, begin in zip(passes, starts):
        n = len(prepared.token_ids)
        rows = mask[begin : begin + n]
        cells = prepared.model.cells
        committed = cells[: prepared.tree_start]
        if committed:
            rows.index_fill_(1, torch.tensor(committed, dtype=torch.long), 0.0)
        open_cells = torch.cat([torch.tensor(cells[prepared.tree_start :], dtype=torch.long), torch.arange(total + begin, total + begin + n)])
        allowed = prepared.tree_mask if prepared.tree_mask is not None else torch.ones(n, n, dtype=torch.bool).tril_()
        rows.index_copy_(1, open_cells, torch.full(allowed.shape, model._mask_min, dtype=model.dtype).masked_fill_(allowed, 0.0))
    return mask.to(model.device)[None, None]


def _logits_source(model: HFModel, inputs: dict, cache) -> Callable[[torch.Tensor], torch.Tensor]:
    """Run the pass; return rows(index) -> float32 logits of those tokens. A plain head is applied to
    the rows asked for only (never [N, V] for a whole batch of prompts)."""
    if model._plain_head:
        decoder = model.model.get_decoder()
        hidden = decoder(**inputs, **{model._decoder_cache_kwarg: cache}).last_hidden_state[0]
        head = model.model.get_output_embeddings()
        return lambda index: head(hidden[index.to(hidden.device)]).float()
    logits = model.model(**inputs, **{model._cache_kwarg: cache}).logits[0]
    return lambda index: logits[index.to(logits.device)].float()


def _decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's layers where the model keeps them in the usual place (Llama, Qwen2, Mistral, ...);
    none elsewhere: a prompt chunk there is not stopped midway, a joining request waits for it."""
    layers = getattr(module.get_decoder(), "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def split_lanes(model: HFModel, count: int, share_prefixes: bool = True) -> list[HFLane]:
    """`count` lanes over one new SharedCache of `model` (its own cache is emptied: the model runs no
    pass of its own afterwards). share_prefixes: a lane may take a prefix another lane holds."""
    if type(model) is not HFModel:
        raise DuospecError(f"{model.name}: continuous batching runs plain transformers models (not {type(model).__name__}); serve it with --max-batch 1")
    if model.deterministic:
        raise DuospecError(f"{model.name}: deterministic mode serves one request at a time; serve it with --max-batch 1")
    model.reset()
    shared = SharedCache(model)
    shared.lanes = [HFLane(shared, index) for index in range(count)]
    for lane in shared.lanes:
        lane._siblings = shared.lanes if share_prefixes else []
    return shared.lanes
