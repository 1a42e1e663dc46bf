"""Deterministic mode: a multi-token pass whose logits equal, bit for bit, one-token decodes of the same prefixes.

Why a greedy speculative answer can differ from `ar` at all: a target pass over n tokens rounds
differently from n one-token passes. Measured on torch 2.13 CPU with Qwen2.5 1.5B in bf16 (hooks on every
module of the first layers, the same tokens both ways): embeddings, norms and the q/k/v projections are
bit-identical; the first difference appears in the *attention output*. transformers' SDPA path calls
`scaled_dot_product_attention` once with all n query rows and a causal mask (or `is_causal`), while a
one-token decode calls it with one query row, no mask, and the grouped query heads packed into rows
(`pack_gqa`): another kernel call, another summation order. (bf16 `linear` was row-invariant there; the
difference then grew through the layers to 0.09-0.18 in the logits.)

The fix is to make every query row go through the very call a one-token decode makes: `rowwise_attention`
runs `sdpa_attention_forward` once per query row, on exactly the keys that row may see (the committed
prefix and, in a tree, its ancestors, in cache order) and no mask. A decode of the same prefix makes the
same call on the same tensors, so it returns the same bits; everything after attention in a layer works
row by row, and the KV cache of accepted tokens is therefore identical too.

What rowwise attention cannot fix is a matmul kernel that picks its summation order by the number of
rows (MKL's float32 GEMM against its GEMV, cuBLAS's per-shape kernels, oneDNN on AMX). So the mode is
*checked, not assumed*: `check_rows` compares, for every linear layer shape of the model, a batch of m
rows with single rows, for each row count m the first time a pass uses it, and an
end-to-end probe at load compares a 4-token pass with 4 decodes. Where either differs, the flag is
refused with the reason, instead of promising what the hardware does not keep.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

import torch

from duospec.config import DuospecError

if TYPE_CHECKING:
    from duospec.models.hf import HFModel

ROWWISE_ATTENTION = "duospec_rowwise"
# Output columns of a linear layer compared per check: the real K (summation length) and the row count
# are what choose a kernel; 2,048 columns keep the check of a 150k-word head cheap.
CHECK_COLUMNS = 2048
ROWS_SAMPLED = 8  # rows compared one by one per check (all of them up to 8, else 8 spread evenly)
# Row counts checked at load: every chain length up to gamma 16, and two longer ones; others when first used.
ROWS_CHECKED_AT_LOAD = (*range(2, 18), 33, 65)

# The rows' key sets of the pass in progress: None = causal (row i sees every cached key up to itself),
# else one entry per row, an int (the first k keys) or an index tensor (prefix + ancestors, in cache order).
# NO_PLAN outside a deterministic HFModel's forward: a model that shares the switched config object (a
# draft built from the target's config) then gets plain SDPA, exactly as before.
NO_PLAN = object()
_row_keys: contextvars.ContextVar = contextvars.ContextVar("duospec_row_keys", default=NO_PLAN)


def rowwise_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers attention function: each query row through the one-token decode's own SDPA call.

    query [1, heads, q, d]; key/value [1, kv_heads, cached + q, d] (the whole cache after this pass's keys
    were appended). Returns ([1, q, heads, d], None) like `sdpa_attention_forward`.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len = query.shape[2]
    plan = _row_keys.get()
    if plan is NO_PLAN:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if q_len == 1 and plan is None:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise DuospecError("deterministic mode runs one sequence at a time (batch 1)")
    if plan is None:
        first = key.shape[2] - q_len
        plan = [first + row + 1 for row in range(q_len)]
    rows = []
    for row, visible in enumerate(plan):
        if isinstance(visible, int):
            keys, values = key[:, :, :visible], value[:, :, :visible]
        else:
            keys, values = key.index_select(2, visible), value.index_select(2, visible)
        rows.append(sdpa_attention_forward(module, query[:, :, row : row + 1], keys, values, None, dropout=dropout, scaling=scaling, **kwargs)[0])
    return torch.cat(rows, dim=1), None


def row_plan(start: int, tree_start: int, tree_mask: torch.Tensor | None) -> list[int | torch.Tensor] | None:
    """The keys each new row may see, in cache order; None for a plain chain (causal).

    start: cached tokens before this pass; tree_start: cached tokens before the open tree (== start
    unless the pass extends an earlier tree); tree_mask [n_new, start - tree_start + n_new].
    """
    if tree_mask is None:
        return None
    mask = tree_mask.to("cpu", torch.bool)
    prefix = torch.arange(tree_start)
    plan: list[int | torch.Tensor] = []
    for row in mask:
        seen = row.nonzero().flatten()
        if torch.equal(seen, torch.arange(seen.numel())):  # the open tree's first k tokens: a plain slice
            plan.append(tree_start + seen.numel())
        else:
            plan.append(torch.cat([prefix, tree_start + seen]))
    return plan


class RowPlan:
    """Context manager: the row plan of one forward pass, read by every layer's `rowwise_attention`."""

    def __init__(self, plan: list[int | torch.Tensor] | None, device: torch.device) -> None:
        self.plan = None if plan is None else [p if isinstance(p, int) else p.to(device) for p in plan]
        self._token = None

    def __enter__(self) -> "RowPlan":
        self._token = _row_keys.set(self.plan)
        return self

    def __exit__(self, *exc) -> None:
        _row_keys.reset(self._token)


def register() -> None:
    """Make `ROWWISE_ATTENTION` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ROWWISE_ATTENTION, rowwise_attention)
    # SDPA's masks, so a model sharing the switched config builds the masks it always did (the mode's
    # own passes ignore them: the row plan says what each row sees).
    ALL_MASK_ATTENTION_FUNCTIONS.register(ROWWISE_ATTENTION, sdpa_mask)


def refuse_unsupported(model: torch.nn.Module, device: torch.device) -> None:
    """Where the mode is not kept: GPUs (measured, see below), and models rowwise attention would compute
    wrongly (sliding windows and soft-capping need a mask or kernel option a one-row, mask-free SDPA call
    does not apply)."""
    if device.type != "cpu":
        # Measured on an H200 (torch 2.11, transformers 5.17, Qwen2.5-1.5B shape, random bf16 weights;
        # docs/bench/deterministic/h200/README.md): with row-wise attention alone, some inputs gave a run of
        # rows differing from one-token decodes by up to 0.09. Hooks found the first difference in an
        # RMSNorm (a reduction whose GPU kernel depends on the row count); running the norms row by row
        # too made chains of 5-48 rows and trees identical on 40 of 40 passes, but a 300-token prompt in
        # 65-row chunks still differed, the GEMMs changed kernel at 512 rows, and per-row kernel launches
        # cost 2.7x at 8 rows and 8x at 32. Not offered on GPUs until all of that is solved.
        raise DuospecError(
            f"--deterministic is only verified on CPUs: on a GPU ({device}) passes and one-token decodes were measured "
            "to differ (up to 0.09 in the logits on an H200), and per-row kernels cost 3-8x there. Run with --device cpu, "
            "or drop --deterministic"
        )
    config = model.config
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or any("sliding" in str(kind) for kind in layer_types):
        raise DuospecError("--deterministic does not support sliding-window attention yet; run this model without it")
    if getattr(config, "attn_logit_softcapping", None):
        raise DuospecError("--deterministic does not support attention soft-capping yet; run this model without it")


class RowCheck:
    """Whether this machine's linear kernels give each row the same bits whatever the row count.

    One check per row count m, cached: for every distinct (in, out, dtype, bias) linear layer, m random
    rows in one call against up to ROWS_SAMPLED of them alone, first and last included.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers: list[torch.nn.Linear] = []
        seen = set()
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                shape = (module.in_features, module.out_features, module.weight.dtype, module.bias is not None)
                if shape not in seen:
                    seen.add(shape)
                    self.layers.append(module)
        self.passed: set[int] = {1}

    @torch.inference_mode()
    def check(self, rows: int) -> None:
        if rows in self.passed:
            return
        generator = torch.Generator().manual_seed(rows)
        for layer in self.layers:
            weight = layer.weight[:CHECK_COLUMNS]
            bias = None if layer.bias is None else layer.bias[:CHECK_COLUMNS]
            x = torch.randn(rows, layer.in_features, generator=generator).to(weight.device, weight.dtype)
            batch = torch.nn.functional.linear(x, weight, bias)
            for row in sorted({round(i * (rows - 1) / (ROWS_SAMPLED - 1)) for i in range(ROWS_SAMPLED)}):
                alone = torch.nn.functional.linear(x[row : row + 1], weight, bias)[0]
                if not torch.equal(batch[row], alone):
                    gap = (batch[row].float() - alone.float()).abs().max().item()
                    raise DuospecError(
                        f"--deterministic cannot be kept here: a {weight.dtype} linear layer ({layer.in_features} -> "
                        f"{layer.out_features}) on {weight.device} gives row {row} of a {rows}-row batch other bits than the "
                        f"same row alone (largest difference {gap:.3g}): this machine's matmul kernel depends on the row count. "
                        "Run without --deterministic, or try another --dtype (on CPUs without native bf16, bfloat16 uses "
                        "torch's own row-invariant kernel)."
                    )
        self.passed.add(rows)


def probe(model: "HFModel", tokens: int = 4) -> None:
    """End to end, at load: a pass over `tokens` new tokens, then a small tree, against one-token decodes, bit for bit."""
    vocab = model.vocab_size
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (3,), generator=generator)
    new = torch.randint(0, vocab, (tokens,), generator=generator)
    model.reset()
    try:
        model.forward(prefix)
        batch = model.forward(new)
        model.crop(3)
        alone = torch.cat([model.forward(new[i : i + 1]) for i in range(tokens)])
    finally:
        model.reset()
    if torch.equal(batch, alone):  # a tree too: a row gathers its keys (a copy) where a decode reads a slice
        batch, alone = _tree_against_decodes(model, prefix, new)
    if not torch.equal(batch, alone):
        gap = (batch - alone).abs().max().item()
        raise DuospecError(
            f"--deterministic cannot be kept with {model.name} here: a {tokens}-token pass (or a 4-node tree) differs from one-token decodes "
            f"by up to {gap:.3g} in the logits even with row-wise attention (an operation of this model or device depends "
            "on the number of rows). Run without --deterministic."
        )


def _tree_against_decodes(model: "HFModel", prefix: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4-node tree (root; two children; a grandchild under the first) in one pass, and each node's
    logits from one-token decodes of its own path."""
    from duospec.tree import TokenTree

    tree = TokenTree(tokens[:4], (-1, 0, 0, 1))
    model.reset()
    try:
        model.forward(prefix)
        scored = model.forward(tree.tokens, len(prefix) + tree.depth_tensor(), tree.ancestor_mask())
        rows = []
        for node in range(tree.n_nodes):
            model.crop(len(prefix))
            for step in tree.path_to(node):
                row = model.forward(tree.tokens[step : step + 1])
            rows.append(row[0])
    finally:
        model.reset()
    return scored, torch.stack(rows)
