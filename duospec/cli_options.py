"""Command-line pieces every sub-command shares (model and decoding flags, loading, exit codes).

They sit below `cli.py` and the sub-commands (bench/cli_commands.py, server/run.py) so that each of
those imports them without importing the others: `cli.py` builds the parser from all sub-commands.
"""

from __future__ import annotations

import argparse

from duospec.config import DRAFT_QUANTIZATIONS
from duospec.drafting import METHODS
from duospec.drafting.suffix import DEFAULT_HISTORY_TOKENS, SUFFIX_SCOPES
from duospec.models.loading import BACKENDS

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model and hardware flags shared by every subcommand that loads models."""
    group = parser.add_argument_group("models and hardware")
    group.add_argument("--target", default=None, help="target model: embedded name, local directory or hub id (default: embedded Qwen2.5-Coder-1.5B-Instruct)")
    group.add_argument("--draft", default=None, help="draft model for sd, multiseq, specexec, duo and auto (default: embedded Qwen2.5-Coder-0.5B-Instruct with the default target)")
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    group.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="weights and activations (default: bfloat16, faster than float32 on CPUs with bf16 support)")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, usually the core count)")
    group.add_argument("--draft-quant", default="auto", choices=DRAFT_QUANTIZATIONS, help="transformers drafts: store the weights as int8 (auto: on CPUs); halves a draft step's memory traffic, exactness unchanged")
    group.add_argument("--backend", default="auto", choices=BACKENDS, help="engine for the target (and the draft unless --draft-backend): auto = llama.cpp on CPUs where llama-cpp-python is installed and the model is GGUF, else transformers")
    group.add_argument("--draft-backend", default=None, choices=BACKENDS, help="engine for the draft (default: as --backend)")
    group.add_argument("--draft-threads", type=int, default=None, help="CPU threads of the draft (default: as --threads)")
    group.add_argument("--ctx-size", type=int, default=None, help="llama.cpp: KV cache cells per model (default 4096, capped by the model's trained context)")
    group.add_argument("--offload", action="store_true", help="target weights in pinned CPU memory, streamed to the GPU layer by layer (needs CUDA; for SpecExec with targets larger than the GPU)")
    group.add_argument(
        "--deterministic",
        action="store_true",
        help="every logit of a multi-token target pass bit-identical to a one-token decode, so greedy output of every method "
        "equals ar's bit for bit (transformers backend; checked on this machine at load, refused where its kernels cannot keep it)",
    )
    group.add_argument(
        "--suffix-history-tokens",
        type=int,
        default=DEFAULT_HISTORY_TOKENS,
        help=f"suffix decoding (suffix, auto): tokens of earlier prompts and answers kept to draft from, oldest evicted first (default {DEFAULT_HISTORY_TOKENS:,}, 4 bytes each)",
    )
    group.add_argument(
        "--suffix-scope",
        default="shared",
        choices=SUFFIX_SCOPES,
        help="suffix decoding drafts from earlier requests of this process (shared, the default) or only from the request itself (request: "
        "one user's text never shapes another's drafts or their timing)",
    )
    group.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="start every request from empty KV caches (default: keep the last request's cache and reuse the token prefix "
        "the next prompt shares with it, so a second turn prefills only what is new; greedy answers stay the same)",
    )


def load_pipeline(args: argparse.Namespace):
    """duospec.load with the model and hardware flags of `add_model_arguments`."""
    import duospec

    return duospec.load(
        args.target,
        args.draft,
        backend=args.backend,
        draft_backend=args.draft_backend,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        draft_threads=args.draft_threads,
        draft_quantization=args.draft_quant,
        context=args.ctx_size,
        offload=args.offload,
        deterministic=args.deterministic,
        suffix_history_tokens=args.suffix_history_tokens,
        suffix_scope=args.suffix_scope,
        prefix_cache=not args.no_prefix_cache,
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding")
    group.add_argument("--method", default="auto", help=f"one of: {', '.join(f'{name} ({spec.summary})' for name, spec in METHODS.items())} (default: auto)")
    group.add_argument("--max-new-tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    group.add_argument("--gamma", type=int, default=None, help="draft tokens per round (default: chosen from measured costs)")
    group.add_argument("--tree-budget", "--budget", dest="budget", type=int, default=None, help="specexec: draft nodes per tree, 1..4096 (default: chosen each round from measured costs and acceptance)")
    group.add_argument("--tree-depth", type=int, default=None, help="specexec: the tree's depth cap, i.e. its draft passes per round (default 16)")
    group.add_argument("--lenience", type=float, default=1.0, help="(0, 1]; < 1 accepts more drafts and is LOSSY (1 = exact)")
    group.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    group.add_argument("--verbose", action="store_true", help="print the measured costs, their corrections, and each round budget chosen (thread split, method) and why")


def decoding_options(args: argparse.Namespace) -> dict[str, object]:
    """The decoding flags `generate` and `bench` share, as keyword arguments."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
