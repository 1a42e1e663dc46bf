"""A synthetic draft/target pair whose greedy acceptance is set by one knob, and measured, on any device.

Why: timing a speculative method needs a pair of the right *shapes* (a 68M or 0.5B draft, a 7B
target) that agrees at a known rate, without a model hub. Random weights agree on nothing; this builds
two ordinary transformers causal LMs (Llama or Qwen2 of any size, wrapped by
`duospec.models.hf.HFModel`, so every method runs them) whose next-token laws share one backbone and
differ by a tunable amount.

Construction (draft and target may differ in hidden size, depth, heads and vocabulary padding):
- A shared *backbone*, a random low-rank bigram law: logits B[t, v] = s * sqrt(rank) * a_t . c_v after
  the last token t, with a_t, c_v random unit vectors of `rank` (64) dimensions; s (`sharpness`, 3) is
  the logits' standard deviation. Each model carries it in its own basis: its embedding row of t is
  a_t (scaled to RMS 1) mapped into its hidden space by a random orthonormal map P (rank x hidden), its
  output row of v is c_v mapped by the same P, so with nothing added by the layers the final norm and
  head read B[t] back exactly.
- The decoder layers add to the residual stream what their random weights compute from the context
  (sharp rotary attention over the whole prefix, then an MLP): a pseudo-random function of the context.
  Their output projections (o_proj, down_proj) are drawn with standard deviation
  mix / sqrt(fan_in * 2 * layers), so the sum of the 2 * layers contributions has about the same size
  at any depth. The target's `mix` is the knob; the draft's (`draft_mix`) is 0 by default, so the
  draft's law is the backbone exactly (its layers still run and cost what they cost).
  mix = 0: the target's law is the draft's (alpha 1). Larger mix: the target's context term outweighs
  the backbone, its argmax leaves the draft's more often, and agreement falls towards chance.
- alpha, the greedy acceptance (the share of draft tokens greedy speculative decoding accepts, i.e.
  the per-position probability that argmax(draft) == argmax(target) after the same prefix), is
  measured by `measure_alpha` on the target's own greedy continuations of random-token prompts (the
  contexts speculative decoding really drafts in); `calibrate_mix` searches the mix for a wanted alpha.
  Agreement is close to independent from position to position: the spread of per-prompt alphas is
  what independent draws give (standard error 0.006 over 200 prompts of 31 positions at alpha 0.6).
- Every parameter draws its values from its own generator (seeded by the pair's seed and the
  parameter's name), so `set_mix` rewrites only the target's output projections, on its device, and a
  model rebuilt with the same seed on the same device is the same model.
- Output embeddings are never tied to the input ones (the Qwen2.5 0.5B/1.5B configs tie them): a tied
  head would make every token predict itself. This changes memory, not the cost of a pass.

The knob, measured on the CPU (float32; the tiny pair: draft hidden 64 x 2 layers, target hidden 96 x 3
layers, vocabulary 256, seed 0; 200 random-token prompts of 16 tokens (seed 2), 32 greedy target tokens
each, alpha over the 31 drafted positions; standard errors 0.003-0.007):

    mix    0.0    0.1    0.2    0.3    0.4    0.5    0.75   1.0    1.5    2.0    3.0
    alpha  1.000  0.898  0.801  0.731  0.662  0.602  0.498  0.383  0.237  0.153  0.076

Other shapes land near it (the knob is normalised by depth): a vocabulary-32,000 pair (draft hidden 768
x 2 layers, target hidden 256 x 8 layers, 60 prompts) measured 0.950, 0.905, 0.843 and 0.666 at mix
0.05, 0.1, 0.2 and 0.5. `calibrate_mix` starts from the table (PRIOR) and corrects the rest; on the
tiny pair it needs one to three measurements per alpha, and a mix calibrated on 200 prompts measures
within 0.01 of the wanted alpha on 200 others (tests/test_synthetic_pair.py allows 0.05).

For timing only: the models' text is meaningless and their acceptance, unlike a real pair's, does not
depend on the task; a benchmark should report the alpha it measured beside its speeds.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch

from duospec.models.hf import HFModel, cache_kwarg_name

# Published configs (config.json) of the models whose shapes the benchmark borrows; random weights.
SHAPES: dict[str, dict] = {
    # For tests: milliseconds per pass on a CPU core.
    "tiny-draft": dict(arch="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024),
    "tiny-target": dict(arch="qwen2", hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024),
    # DuoDecoding's pair: a 68M Llama draft (double7/vicuna-68m) beside a Llama-2-7B / Vicuna-7B target.
    "vicuna-68m": dict(arch="llama", hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12, num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048),
    "llama-2-7b": dict(arch="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    # Qwen2.5 (the 7B pads its vocabulary to 152,064; the smaller ones have 151,936).
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(arch="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768),
    "qwen2.5-7b": dict(arch="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768),
}
# (draft shape, target shape)
PAIRS: dict[str, tuple[str, str]] = {
    "tiny": ("tiny-draft", "tiny-target"),
    "llama-2-7b+68m": ("vicuna-68m", "llama-2-7b"),
    "qwen2.5-7b+0.5b": ("qwen2.5-0.5b", "qwen2.5-7b"),
    "qwen2.5-1.5b+0.5b": ("qwen2.5-0.5b", "qwen2.5-1.5b"),
}

DEFAULT_RANK = 64
DEFAULT_SHARPNESS = 3.0
DEFAULT_DRAFT_MIX = 0.0
QK_GAIN = 2.0  # query/key weights at 2 / sqrt(hidden): sharp attention, so the context term varies with the context
_OUTPUT_PROJECTIONS = ("o_proj", "down_proj")


@dataclass(frozen=True)
class Backbone:
    """The shared bigram law: a [V, rank] (unit rows, the last token's side) and c [V, rank] (unit
    rows, the next token's side); logits s * sqrt(rank) * a_t . c_v (standard deviation about s).
    Built on the CPU in float64, so that every device builds its models from the same numbers."""

    a: torch.Tensor
    c: torch.Tensor
    sharpness: float

    @staticmethod
    def random(vocab_size: int, rank: int = DEFAULT_RANK, sharpness: float = DEFAULT_SHARPNESS, seed: int = 0) -> Backbone:
        generator = torch.Generator().manual_seed(_seed(seed, "backbone"))
        a = torch.randn(vocab_size, rank, generator=generator, dtype=torch.float64)
        c = torch.randn(vocab_size, rank, generator=generator, dtype=torch.float64)
        return Backbone(a / a.norm(dim=1, keepdim=True), c / c.norm(dim=1, keepdim=True), sharpness)

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.a.shape[0]

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[n, V] float64: the backbone's logits after each token (what a model with no layers gives)."""
        return self.sharpness * math.sqrt(self.rank) * self.a[tokens] @ self.c.T


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def make_config(shape: str | dict):
    """The transformers config of a SHAPES entry (untied output embeddings, sdpa attention)."""
    spec = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    arch = spec.pop("arch")
    common = dict(tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None, rms_norm_eps=1e-6)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**spec, **common, rope_theta=10000.0)
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**spec, **common, rope_theta=1_000_000.0)
    raise ValueError(f"unknown architecture {arch!r} (llama or qwen2)")


def build_model(
    shape: str | dict,
    backbone: Backbone,
    mix: float,
    *,
    seed: int = 0,
    role: str = "model",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A causal LM of `shape` carrying `backbone`, its layers' output projections scaled by `mix`.

    role names the model's private random streams (its basis, its layers): the draft and the target
    of a pair use different roles, so their context terms are unrelated."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    device = torch.device(device)
    config = make_config(shape)
    if config.vocab_size < backbone.vocab_size:
        raise ValueError(f"the backbone has {backbone.vocab_size} tokens, more than the model's {config.vocab_size}")
    with no_init_weights(), device:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model._synthetic = {"seed": seed, "role": role, "mix": float(mix)}
    hidden = config.hidden_size
    with torch.no_grad():
        basis = _basis(backbone.rank, hidden, _seed(seed, f"{role}/basis"))  # [rank, hidden] orthonormal rows, float64 CPU
        vocab = backbone.vocab_size
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        # Embedding rows of RMS 1 (norm sqrt(hidden)); the head reads s * a_t . c_v back after the final norm.
        embed.zero_()
        head.zero_()  # ids past the backbone's vocabulary (the 7B's padding): logit 0, never the argmax in practice
        _write_rows(embed, backbone.a * math.sqrt(hidden), basis)
        _write_rows(head, backbone.c * (backbone.sharpness * math.sqrt(backbone.rank) / math.sqrt(hidden)), basis)
        if embed.shape[0] > vocab:
            extra = embed[vocab:]
            extra.normal_(0.0, 1.0, generator=_generator(seed, f"{role}/embed-extra", device))
        for name, parameter in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                continue
            if "norm" in name:
                parameter.fill_(1.0)
            elif name.endswith(".bias"):
                parameter.zero_()
            else:
                parameter.normal_(0.0, _std(name, parameter, mix, config.num_hidden_layers), generator=_generator(seed, f"{role}/{name}", device))
    return model.eval()


def set_mix(model: torch.nn.Module, mix: float) -> None:
    """Rewrite `model`'s output projections for a new mix (the same random draws, scaled): the model
    equals one built with this mix, on the same device, without rebuilding the rest."""
    info = model._synthetic
    device = model.device
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if _is_output_projection(name):
                parameter.normal_(0.0, _std(name, parameter, mix, model.config.num_hidden_layers), generator=_generator(info["seed"], f"{info['role']}/{name}", device))
    info["mix"] = float(mix)


def _is_output_projection(name: str) -> bool:
    return any(f".{projection}." in name for projection in _OUTPUT_PROJECTIONS) and name.endswith(".weight")


def _std(name: str, parameter: torch.Tensor, mix: float, layers: int) -> float:
    fan_in = parameter.shape[1]
    if _is_output_projection(name):
        # 2 * layers projections add to the residual stream: their sum has about the same size at any depth.
        return mix / math.sqrt(fan_in * 2 * layers)
    if ".q_proj." in name or ".k_proj." in name:
        return QK_GAIN / math.sqrt(fan_in)
    return 1.0 / math.sqrt(fan_in)


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed(seed, name))


def _basis(rank: int, hidden: int, seed: int) -> torch.Tensor:
    if rank > hidden:
        raise ValueError(f"backbone rank {rank} exceeds the hidden size {hidden}")
    gaussian = torch.randn(hidden, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)  # [hidden, rank], orthonormal columns
    return q.T.contiguous()


def _write_rows(weight: torch.Tensor, left: torch.Tensor, basis: torch.Tensor, block: int = 16384) -> None:
    """weight[:len(left)] = left @ basis, block by block on the weight's device in float32 (the whole
    product for a 152k x 3584 head would be 2 GB in float32)."""
    basis = basis.to(weight.device, torch.float32)
    for start in range(0, left.shape[0], block):
        rows = left[start : start + block].to(weight.device, torch.float32) @ basis
        weight[start : start + rows.shape[0]].copy_(rows)


# ---------------------------------------------------------------------------------------------------
# The pair


@dataclass
class SyntheticPair:
    """A draft module and a target module sharing one backbone; `mix` is the target's knob."""

    name: str
    draft: torch.nn.Module
    target: torch.nn.Module
    backbone: Backbone
    seed: int
    mix: float
    draft_mix: float
    alphas: dict = field(default_factory=dict)  # mix -> measured alpha (what calibration saw)

    def set_mix(self, mix: float) -> None:
        set_mix(self.target, mix)
        self.mix = float(mix)

    def draft_model(self, name: str = "synthetic-draft") -> HFModel:
        return HFModel(self.draft, name)

    def target_model(self, name: str = "synthetic-target") -> HFModel:
        return HFModel(self.target, name)

    @property
    def vocab_size(self) -> int:
        """Token ids both models know (prompts draw from these)."""
        return self.backbone.vocab_size

    @property
    def token_count(self) -> int:
        """The wider of the two models' vocabularies (the tokenizer's size)."""
        return max(self.draft.config.vocab_size, self.target.config.vocab_size)


def build_pair(
    pair: str | tuple[str, str] = "tiny",
    mix: float = 0.0,
    *,
    seed: int = 0,
    draft_mix: float = DEFAULT_DRAFT_MIX,
    rank: int = DEFAULT_RANK,
    sharpness: float = DEFAULT_SHARPNESS,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    draft_device: str | torch.device | None = None,
    draft_dtype: torch.dtype | None = None,
) -> SyntheticPair:
    """The draft and target of `pair` (a PAIRS name or (draft shape, target shape)) at knob `mix`.

    The target is built on `device` in `dtype`, the draft on draft_device / draft_dtype (default: the
    same). Build big targets directly on the GPU: random draws there take well under a second."""
    draft_shape, target_shape = PAIRS[pair] if isinstance(pair, str) else pair
    vocab = min(_shape(draft_shape)["vocab_size"], _shape(target_shape)["vocab_size"])
    rank = min(rank, _shape(draft_shape)["hidden_size"], _shape(target_shape)["hidden_size"])
    backbone = Backbone.random(vocab, rank, sharpness, seed)
    draft = build_model(draft_shape, backbone, draft_mix, seed=seed, role="draft", device=draft_device or device, dtype=draft_dtype or dtype)
    target = build_model(target_shape, backbone, mix, seed=seed, role="target", device=device, dtype=dtype)
    name = pair if isinstance(pair, str) else f"{target_shape}+{draft_shape}"
    return SyntheticPair(name, draft, target, backbone, seed, float(mix), draft_mix)


def synthetic_tokenizer(vocab_size: int):
    """A transformers tokenizer for models that have none: token i is the word "<i>" (answers decode
    to "<12> <7> ..."), no EOS (every generation runs to max_new_tokens, so methods are compared on
    the same tokens), no chat template (prompts are token ids). Saved beside a draft (`save_draft`),
    the draft loads as a `--draft PATH` would; read it back with `load_tokenizer` (transformers may
    substitute its own class for the model type)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def save_draft(pair: SyntheticPair, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write the pair's draft as a transformers checkpoint with its tokenizer (`synthetic_tokenizer`
    of the pair's widest vocabulary unless given): the path a Pipeline's draft_source, or duo's
    draft process, loads it from."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pair.draft.save_pretrained(directory)
    (tokenizer or synthetic_tokenizer(pair.token_count)).save_pretrained(directory)
    return directory  # load_tokenizer(directory): the tokenizer a Pipeline over this draft needs


def synthetic_pipeline(
    target: HFModel,
    draft: HFModel | str | os.PathLike | None = None,
    *,
    tokenizer=None,
    draft_device: str | torch.device = "cpu",
    draft_dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    prefix_cache: bool = False,
):
    """A duospec Pipeline over a synthetic target: every method runs (`pipe.generate(token_ids, method=...)`).

    draft: an HFModel (attached in memory: sd, multiseq, specexec use it where it lies; duo pickles it
    into its draft process) or the path of a checkpoint written by `save_draft` (loaded as `--draft
    PATH` loads, on draft_device in draft_dtype, in this process for the in-process methods and by duo's
    draft process itself: the production path). prefix_cache is off by default: a benchmark that
    repeats a prompt across methods must not let one method reuse the last one's cache."""
    from duospec.api import Pipeline
    from duospec.models.loading import LoadOptions

    source = None if draft is None or isinstance(draft, HFModel) else str(draft)
    if tokenizer is None:
        tokenizer = synthetic_tokenizer(target.vocab_size) if source is None else load_tokenizer(source)
    pipe = Pipeline(
        target,
        tokenizer,
        draft_source=source,
        draft_options=None if source is None else LoadOptions(backend="transformers", device=torch.device(draft_device), dtype=draft_dtype),
        device=target.device,
        dtype=target.dtype,
        threads=threads if threads is not None else torch.get_num_threads(),
        eos_ids=frozenset(),
        progress=False,
        prefix_cache=prefix_cache,
    )
    if isinstance(draft, HFModel):
        pipe.attach_draft(draft)
    return pipe


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a checkpoint written by `save_draft`, as loading the draft from it gives it
    (transformers forces its own class on some model types, e.g. Qwen2Tokenizer for qwen2, which adds
    <|endoftext|> past the ids): a Pipeline whose draft loads from `path` must hold this one."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _shape(shape: str | dict) -> dict:
    return SHAPES[shape] if isinstance(shape, str) else shape


def random_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """[count, length] token ids drawn uniformly (CPU, int64)."""
    return torch.randint(0, vocab_size, (count, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# Measuring and calibrating the agreement


@torch.inference_mode()
def greedy_continuations(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, batch_size: int = 64) -> torch.Tensor:
    """[count, new_tokens] the model's greedy continuation of each prompt (batched, with a KV cache)."""
    from transformers import DynamicCache

    keyword = cache_kwarg_name(model)
    out = []
    for start in range(0, len(prompts), batch_size):
        tokens = prompts[start : start + batch_size].to(model.device)
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=tokens, use_cache=True, logits_to_keep=1, **{keyword: cache}).logits[:, -1]
        new = [logits.argmax(-1)]
        for _ in range(new_tokens - 1):
            logits = model(input_ids=new[-1][:, None], use_cache=True, **{keyword: cache}).logits[:, -1]
            new.append(logits.argmax(-1))
        out.append(torch.stack(new, dim=1).cpu())
    return torch.cat(out)


@torch.inference_mode()
def draft_argmax(model: torch.nn.Module, sequences: torch.Tensor, first: int, batch_size: int = 16) -> torch.Tensor:
    """[count, length - first] the model's argmax after each prefix sequences[:, :i + 1], i >= first."""
    out = []
    for start in range(0, len(sequences), batch_size):
        tokens = sequences[start : start + batch_size].to(model.device)
        hidden = model.get_decoder()(input_ids=tokens).last_hidden_state[:, first:-1]
        out.append(model.get_output_embeddings()(hidden).argmax(-1).cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class AlphaMeasurement:
    alpha: float  # agreement over every drafted position
    per_prompt: list[float]  # each prompt's agreement
    positions: int

    @property
    def stderr(self) -> float:
        """Standard error of alpha from the spread between prompts (agreement within a prompt is correlated)."""
        values = torch.tensor(self.per_prompt, dtype=torch.float64)
        return float(values.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def measure_alpha(
    draft: torch.nn.Module | HFModel,
    target: torch.nn.Module | HFModel,
    prompts: torch.Tensor,
    new_tokens: int = 32,
    detail: bool = False,
    batch_size: int = 64,
) -> float | AlphaMeasurement:
    """Greedy acceptance of `draft` against `target`: on the target's greedy continuation of each
    prompt (the output of greedy speculative decoding), the fraction of positions after the first new
    token where the draft's argmax is the target's next token. That is the chance that greedy
    speculative decoding accepts a draft token, given the ones before it were accepted.

    prompts: [count, length] token ids (random_prompts). detail: return an AlphaMeasurement.
    batch_size: prompts per batched target pass (the draft's passes take a quarter as many)."""
    draft = draft.model if isinstance(draft, HFModel) else draft
    target = target.model if isinstance(target, HFModel) else target
    continuation = greedy_continuations(target, prompts, new_tokens, batch_size)
    sequences = torch.cat([prompts, continuation], dim=1)
    # Drafted positions: after prompt + t1 .. t(k), predicting t(k+1), k = 1 .. new_tokens - 1.
    predicted = draft_argmax(draft, sequences, prompts.shape[1], max(1, batch_size // 4))
    agree = (predicted == continuation[:, 1:]).double()
    alpha = float(agree.mean())
    if not detail:
        return alpha
    return AlphaMeasurement(alpha, agree.mean(1).tolist(), agree.numel())


# alpha by mix for the tiny pair (the table in the module docstring): the first guess of calibrate_mix.
# The knob is normalised by depth, so other shapes land near it (a vocabulary of 32,000 measured a few
# points higher at the same mix); the search corrects the rest.
PRIOR = ((0.0, 1.0), (0.1, 0.898), (0.2, 0.801), (0.3, 0.731), (0.4, 0.662), (0.5, 0.602), (0.75, 0.498), (1.0, 0.383), (1.5, 0.237), (2.0, 0.153), (3.0, 0.076))


def _prior_mix(alpha: float) -> float:
    for (mix_a, alpha_a), (mix_b, alpha_b) in pairwise(PRIOR):
        if alpha_b <= alpha <= alpha_a:
            return mix_a + (alpha_a - alpha) / (alpha_a - alpha_b) * (mix_b - mix_a)
    return PRIOR[-1][0] if alpha < PRIOR[-1][1] else 0.0


def calibrate_mix(
    pair: SyntheticPair,
    alpha_wanted: float,
    prompts: torch.Tensor | None = None,
    new_tokens: int = 32,
    tolerance: float = 0.01,
    max_steps: int = 10,
    known: dict[float, float] | None = None,
    batch_size: int = 64,
) -> tuple[float, float]:
    """Search the target's mix until measure_alpha(prompts) is within `tolerance` of alpha_wanted;
    leaves the pair at the best mix found and returns (mix, its measured alpha).

    Alpha falls as mix grows. The search starts from the tiny pair's table (PRIOR), brackets the
    wanted alpha and narrows the bracket by safeguarded interpolation (2-4 measurements usually).
    known: mix -> alpha already measured on the same prompts (the dict is updated): calibrating several
    alphas in a row reuses each other's points. prompts default: 200 random prompts of 16 tokens (seed 1).
    The draft and target are measured where they lie: put the draft on the target's device for speed."""
    if prompts is None:
        prompts = random_prompts(200, 16, pair.vocab_size, seed=1)
    points = known if known is not None else {}

    def alpha_at(mix: float) -> float:
        mix = round(mix, 6)
        if mix not in points:
            pair.set_mix(mix)
            points[mix] = measure_alpha(pair.draft, pair.target, prompts, new_tokens, batch_size=batch_size)
            pair.alphas[mix] = points[mix]
        return points[mix]

    def best() -> tuple[float, float]:
        return min(points.items(), key=lambda item: (abs(item[1] - alpha_wanted), item[0]))

    steps = 0
    if not points:
        alpha_at(_prior_mix(alpha_wanted))
        steps += 1
    # Bracket: low mix (alpha above the wanted one) and high mix (alpha below it).
    while steps < max_steps and abs(best()[1] - alpha_wanted) > tolerance:
        above = [m for m, a in points.items() if a > alpha_wanted]
        below = [m for m, a in points.items() if a < alpha_wanted]
        if not above:
            low = min(points)
            if low == 0.0:
                break  # alpha at mix 0 is the ceiling: the draft's own context term (draft_mix)
            alpha_at(low / 4 if low > 0.05 else 0.0)
        elif not below:
            high = max(points)
            if high >= 64:
                break
            alpha_at(max(2 * high, 0.1))
        else:
            low, high = max(above), min(below)
            if low >= high:  # measurement noise crossed the bracket: nothing finer to learn
                break
            alpha_low, alpha_high = points[low], points[high]
            guess = low + (alpha_low - alpha_wanted) / (alpha_low - alpha_high) * (high - low)
            margin = 0.1 * (high - low)  # never next to an end: the bracket shrinks by 10% at least
            alpha_at(min(max(guess, low + margin), high - margin))
        steps += 1
    mix, alpha = best()
    pair.set_mix(mix)
    return mix, alpha


def chain_acceptance(stats) -> tuple[int, int]:
    """(accepted, examined) draft tokens of a chain method's answer (sd, with any draft): a round's
    verifier examines its accepted tokens and the first rejected one, if any. Not for trees."""
    accepted = examined = 0
    rounds = list(zip(stats.gammas, stats.tokens_per_pass[1:]))
    for index, (drafted, emitted) in enumerate(rounds):
        if not drafted:
            continue
        kept = min(emitted - 1, drafted)
        cut = index == len(rounds) - 1  # the request's length may have cut the last round short
        accepted += kept
        examined += kept + (kept < drafted and not cut)
    return accepted, examined


def chain_alpha(stats) -> float | None:
    """Per-token greedy acceptance of a chain method's answer: accepted / examined draft tokens
    (chain_acceptance). It estimates what measure_alpha measures; None when no round drafted."""
    accepted, examined = chain_acceptance(stats)
    return accepted / examined if examined else None
