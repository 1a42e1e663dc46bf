"""SpecExec end to end on a CUDA GPU with an offloaded target: exactness and the cost of a round by budget.

Run on a GPU machine with no model hub: `PYTHONPATH=. python3 scripts/specexec_gpu.py --out DIR`.

1. Exactness on CUDA: greedy `specexec` equals `ar` token for token on a small float32 target (resident
   and offloaded) with a partly-right draft, at several budgets.
2. Cost of a round by budget: a Qwen2.5-7B-shaped target (random bf16 weights, offloaded with
   `--offload`'s code) and a Qwen2.5-0.5B-shaped draft (random weights, resident), SpecExec at fixed
   budgets: seconds per round split into the draft's tree search and the target's verification pass.
   Random weights accept next to nothing, so tokens per second here mean nothing; the per-round costs
   are real, and combined with the acceptance by budget measured with the real pair (README) they give
   the projected speed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offload_check import SHAPES, build, log  # noqa: E402  (the same random-weight models)

from duospec.budget.tree import TreeBudgetPolicy  # noqa: E402
from duospec.config import GenerationRequest, SamplingConfig  # noqa: E402
from duospec.drafting.specexec import SpecExecDrafter  # noqa: E402
from duospec.engines.in_process import InProcessSource  # noqa: E402
from duospec.engines.rounds import generate_tokens  # noqa: E402
from duospec.models.hf import HFModel  # noqa: E402
from duospec.models.offload import offload_layers  # noqa: E402
from duospec.stats import GenerationStats  # noqa: E402

SHAPES["0.5b"] = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=152064, tie_word_embeddings=True)
BUDGETS = [1, 4, 16, 64, 256, 1024, 2048, 4096]


def run(target: HFModel, draft: HFModel | None, prompt: list[int], method: str, new_tokens: int, budget: int | None = None) -> tuple[list[int], GenerationStats]:
    request = GenerationRequest(method=method, max_new_tokens=new_tokens, sampling=SamplingConfig(), tree_budget=budget)
    stats = GenerationStats(method=method, prompt_tokens=len(prompt))
    drafter = SpecExecDrafter(draft, target.vocab_size) if method == "specexec" else None
    policy = TreeBudgetPolicy(None, None, fixed_budget=budget) if method == "specexec" else None
    tokens = [t for chunk in generate_tokens(target, InProcessSource(drafter, policy), prompt, request, frozenset(), stats) for t in chunk]
    torch.cuda.synchronize()
    return tokens, stats


def exactness() -> dict:
    """Greedy specexec == ar on CUDA, resident and offloaded float32 targets, partly-right draft."""
    target_module = build("small", "cuda", torch.float32, seed=0, head_std=0.3)
    draft_module = build("small", "cuda", torch.float32, seed=0, head_std=0.3)
    with torch.no_grad():  # a draft that is the target plus noise: partial acceptance
        generator = torch.Generator("cuda").manual_seed(5)
        for parameter in draft_module.parameters():
            parameter.add_(0.3 * parameter.std() * torch.randn(parameter.shape, generator=generator, device="cuda"))
    draft = HFModel(draft_module)
    results = {}
    for label, target in (("resident", HFModel(target_module)), ("offloaded", HFModel(offload_layers(build("small", "cpu", torch.float32, seed=0, head_std=0.3), torch.device("cuda"))))):
        for seed in range(3):
            prompt = torch.randint(0, SHAPES["small"]["vocab_size"], (24,), generator=torch.Generator().manual_seed(seed)).tolist()
            reference, _ = run(target, None, prompt, "ar", 48)
            for budget in (1, 8, 64, 512):
                tokens, stats = run(target, draft, prompt, "specexec", 48, budget)
                key = f"{label} seed {seed} budget {budget}"
                results[key] = {"identical": tokens == reference, "tokens_per_pass": round(stats.mean_accepted, 2)}
                if tokens != reference:
                    log(f"MISMATCH {key}")
    log(f"exactness: {sum(r['identical'] for r in results.values())}/{len(results)} identical")
    return results


def round_costs(new_tokens: int) -> dict:
    # Drawn on the GPU (fast), then moved to the CPU and offloaded from there, as --offload loads.
    target = HFModel(offload_layers(build("7b", "cuda", torch.bfloat16).to("cpu"), torch.device("cuda")))
    torch.cuda.empty_cache()
    draft = HFModel(build("0.5b", "cuda", torch.bfloat16, seed=1))
    prompt = list(range(1000, 1256))
    run(target, draft, prompt, "specexec", 4, 16)  # warm-up: kernels, staging buffers, allocator
    _, ar = run(target, None, prompt, "ar", new_tokens)
    rows = {"ar": {"seconds_per_pass": (ar.target_seconds + ar.verify_seconds) / max(1, ar.target_passes - 1)}}
    log(f"ar: {rows['ar']['seconds_per_pass'] * 1000:.1f} ms per target pass")
    for budget in BUDGETS:
        _, stats = run(target, draft, prompt, "specexec", new_tokens, budget)
        rounds = max(1, stats.target_passes - 1)
        rows[str(budget)] = {
            "rounds": rounds,
            "mean_tree_nodes": sum(stats.gammas) / max(1, len(stats.gammas)),
            "draft_seconds_per_round": stats.draft_seconds / rounds,
            "pass_seconds": (stats.target_seconds + stats.verify_seconds) / rounds,  # verify holds the wait for the GPU
            "target_seconds_per_round": stats.target_seconds / rounds,
            "verify_seconds_per_round": stats.verify_seconds / rounds,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
        }
        row = rows[str(budget)]
        log(f"budget {budget}: draft {row['draft_seconds_per_round'] * 1000:.0f} ms + target pass {row['pass_seconds'] * 1000:.0f} ms per round ({row['mean_tree_nodes']:.0f} nodes)")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--skip-exactness", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    path = args.out / "specexec_gpu.json"
    try:
        report["exactness"] = "skipped" if args.skip_exactness else exactness()
    except Exception as error:  # keep going: the costs are still worth having
        report["exactness"] = {"error": repr(error)}
        log(f"exactness FAILED: {error!r}")
    path.write_text(json.dumps(report, indent=1))
    report["round_costs"] = round_costs(args.new_tokens)
    path.write_text(json.dumps(report, indent=1))
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
