"""DuoDecoding beside the other methods on a CUDA GPU, with synthetic pairs of set acceptance.

Run on a GPU machine with no model hub: `PYTHONPATH=. python3 scripts/duo_gpu.py --out DIR` (one call,
under ten minutes; `--budget-s` stops starting new work in time). On a CPU, for CI:
`PYTHONPATH=. python3 scripts/duo_gpu.py --tiny --out DIR` runs the same code end to end with the tiny
pair, target and draft on the CPU, in well under a minute (tests/test_synthetic_pair.py runs it).

Pairs (random weights built by duospec/synthetic.py; nothing is downloaded): the paper's shapes, a
Llama-2-7B-shaped target with a 68M draft (2 layers, hidden 768, like vicuna-68m), and ours, Qwen2.5-7B
with 0.5B and Qwen2.5-1.5B with 0.5B. For each pair and each wanted greedy acceptance alpha (0.6, 0.8,
0.9) the target's knob is calibrated (`calibrate_mix` on random prompts; the alpha it measured is in
the report), then every method answers the same random-token prompts, greedy:

    ar            the target alone (bfloat16 on the GPU)
    sd            speculative decoding, the draft (float32) on the GPU
    sd-cpu-draft  speculative decoding, the draft on the CPU in this process: drafting and verifying
                  take turns (no overlap)
    duo           DuoDecoding: the draft in its own CPU process (loaded there from a checkpoint the
                  script writes, as `--draft PATH` loads), drafting while the target verifies
    multiseq      multi-sequence drafts verified as one tree, the draft on the GPU
    specexec      SpecExec's best-first trees, the draft on the GPU (target resident, not offloaded)

Budgets are duospec's own (measured costs, online acceptance); the thread split duo measures and
chooses is recorded. Each method answers one short warm-up request per pair first (cost measurements,
duo's split and process start, CUDA kernels), reported as its setup time. Per answer: tokens/s (prompt
pass included) and after the first token, time to first token, tokens per target pass, the accepted
share of draft tokens and the per-token greedy acceptance of chain rounds (`chain_alpha`, comparable
with the calibrated alpha), seconds per round spent drafting (duo: waiting for the draft process),
in the target's pass and verifying, and whether the tokens equal ar's (where not: the first differing
token and the target's top-two logit margin there; in bfloat16 a multi-token pass may round a
near-tie differently, DESIGN.md section 3). Writes duo_gpu.json (after every alpha) and duo_gpu.md to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from duospec.models.hf import HFModel  # noqa: E402
from duospec.synthetic import PAIRS, build_pair, calibrate_mix, chain_alpha, load_tokenizer, random_prompts, save_draft, synthetic_pipeline, synthetic_tokenizer  # noqa: E402

START = time.perf_counter()
# (row name, pipeline: "device" has the draft beside the target, "cpu" loads it on the CPU from its checkpoint, duospec method)
METHODS = (
    ("ar", "device", "ar"),
    ("sd", "device", "sd"),
    ("sd-cpu-draft", "cpu", "sd"),
    ("duo", "cpu", "duo"),
    ("multiseq", "device", "multiseq"),
    ("specexec", "device", "specexec"),
)
GPU_PAIRS = ("llama-2-7b+68m", "qwen2.5-7b+0.5b", "qwen2.5-1.5b+0.5b")
ALPHAS = (0.6, 0.8, 0.9)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_row(pipe, method: str, prompt: list[int], new_tokens: int) -> tuple[list[int], dict]:
    result = pipe.generate(prompt, method=method, max_new_tokens=new_tokens)
    stats = result.stats
    rounds = max(1, stats.target_passes - 1)
    alpha = chain_alpha(stats) if method == "sd" else None
    row = {
        "new_tokens": stats.new_tokens,
        "seconds": stats.seconds,
        "tokens_per_second": stats.tokens_per_second,
        "generation_tokens_per_second": stats.generation_tokens_per_second,
        "ttft_seconds": stats.ttft_seconds,
        "target_passes": stats.target_passes,
        "tokens_per_pass": stats.mean_accepted,
        "drafted_tokens": stats.drafted_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "acceptance_rate": stats.acceptance_rate,
        "chain_alpha": alpha,
        "mean_draft_per_round": stats.mean_draft_per_round,  # duo, multiseq, specexec: tree nodes
        "draft_tokens_per_round": list(stats.gammas),
        "rounds": stats.target_passes - 1,
        "per_round_seconds": {
            "draft": stats.draft_seconds / rounds,  # duo: the target's wait for the draft process
            "target": stats.target_seconds / rounds,
            "verify": stats.verify_seconds / rounds,
        },
        "time_breakdown": stats.to_dict()["time_breakdown"],
        "fallback": stats.fallback or None,
    }
    return result.token_ids, row


@torch.inference_mode()
def divergence(target: torch.nn.Module, prompt: list[int], reference: list[int], tokens: list[int]) -> dict:
    """Where tokens first leave ar's, and the target's top-two logit margin after ar's prefix there."""
    index = next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), min(len(reference), len(tokens)))
    context = torch.tensor([prompt + reference[:index]], device=target.device)
    logits = target(input_ids=context, logits_to_keep=1).logits[0, -1].float()
    top = logits.topk(2).values
    return {"first_difference": index, "top2_margin": float(top[0] - top[1])}


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["pair"], row["alpha_wanted"], row["method"]), []).append(row)
    summary = []
    for (pair, alpha, method), members in groups.items():
        tokens = sum(r["new_tokens"] for r in members)
        seconds = sum(r["seconds"] for r in members)
        passes = sum(r["target_passes"] for r in members)
        drafted = sum(r["drafted_tokens"] for r in members)
        rounds = sum(max(1, r["rounds"]) for r in members)
        chain = [r["chain_alpha"] for r in members if r["chain_alpha"] is not None]
        summary.append({
            "pair": pair,
            "alpha_wanted": alpha,
            "alpha_calibrated": members[0]["alpha_calibrated"],
            "mix": members[0]["mix"],
            "method": method,
            "answers": len(members),
            "tokens_per_second": tokens / seconds if seconds else None,
            "ttft_seconds": sum(r["ttft_seconds"] for r in members) / len(members),
            "tokens_per_pass": tokens / passes if passes else None,
            "acceptance_rate": sum(r["accepted_tokens"] for r in members) / drafted if drafted else None,
            "chain_alpha": sum(chain) / len(chain) if chain else None,
            "mean_draft_per_round": sum(r["drafted_tokens"] for r in members) / max(1, sum(sum(1 for g in r["draft_tokens_per_round"] if g) for r in members)),
            "draft_ms_per_round": 1000 * sum(r["per_round_seconds"]["draft"] * max(1, r["rounds"]) for r in members) / rounds,
            "target_ms_per_round": 1000 * sum(r["per_round_seconds"]["target"] * max(1, r["rounds"]) for r in members) / rounds,
            "identical_to_ar": all(r["identical_to_ar"] for r in members),
        })
    ar_rate = {(s["pair"], s["alpha_wanted"]): s["tokens_per_second"] for s in summary if s["method"] == "ar"}
    for s in summary:
        base = ar_rate.get((s["pair"], s["alpha_wanted"]))
        s["speedup_vs_ar"] = s["tokens_per_second"] / base if base and s["tokens_per_second"] else None
    return summary


def size(params: int | None) -> str:
    if not params:
        return "?"
    return f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M" if params >= 1e6 else f"{params / 1e3:.0f}k"


def markdown(report: dict) -> str:
    def number(value, digits=2, scale=1.0):
        return "-" if value is None else f"{value * scale:.{digits}f}"

    lines = [f"# duo_gpu: {report['device']} (torch {report['torch']}, transformers {report['transformers']})", ""]
    for name, pair in report["pairs"].items():
        lines.append(f"## {name}: draft {pair.get('draft_shape')} ({size(pair.get('draft_params'))}, float32), target {pair.get('target_shape')} ({size(pair.get('target_params'))}, {report['target_dtype']})")
        if "error" in pair:
            lines.append(f"FAILED: {pair['error']}")
        duo = pair.get("duo", {})
        if duo:
            lines.append(f"- duo's thread split: {duo.get('split')}; budget: {duo.get('planner')}")
        for key, label in (("sd_draft_step_device_s", "draft step beside the target"), ("sd_draft_step_cpu_s", "draft step on the CPU")):
            if pair.get(key) is not None:
                lines.append(f"- {label}: {pair[key] * 1000:.1f} ms; target pass t(1) {pair.get('target_t1_s', 0) * 1000:.1f} ms")
        if pair.get("skipped"):
            lines.append(f"- skipped: {'; '.join(pair['skipped'])}")
        lines += ["", "| alpha wanted | alpha calibrated | method | tok/s | x ar | TTFT ms | tokens/pass | drafted/round | accepted | chain alpha | draft ms/round | target ms/round | = ar |", "|" + "---|" * 13]
        for s in (s for s in report["summary"] if s["pair"] == name):
            lines.append(
                f"| {s['alpha_wanted']} | {number(s['alpha_calibrated'], 3)} | {s['method']} | {number(s['tokens_per_second'], 1)} | {number(s['speedup_vs_ar'])} | "
                f"{number(s['ttft_seconds'], 1, 1000)} | {number(s['tokens_per_pass'])} | {number(s['mean_draft_per_round'], 1)} | {number(s['acceptance_rate'])} | {number(s['chain_alpha'], 3)} | "
                f"{number(s['draft_ms_per_round'], 1)} | {number(s['target_ms_per_round'], 1)} | {'yes' if s['identical_to_ar'] else 'NO'} |"
            )
        lines.append("")
    lines.append(f"greedy duo == ar on every answer: {report['greedy_duo_equals_ar']}; total {report.get('total_s', 0):.0f} s")
    return "\n".join(lines) + "\n"


def run_pair(name: str, args, device: torch.device, dtype: torch.dtype, scratch: Path, report: dict, save, deadline: float) -> None:
    entry: dict = {"skipped": []}
    report["pairs"][name] = entry
    draft_shape, target_shape = PAIRS[name]
    entry.update(draft_shape=draft_shape, target_shape=target_shape)
    start = time.perf_counter()
    # The draft is built on the CPU in float32 (duo's process and sd-cpu-draft load this checkpoint);
    # the copy beside the target has the same weights, so every method drafts the same law.
    pair = build_pair(name, 0.0, seed=args.seed, device=device, dtype=dtype, draft_device="cpu", draft_dtype=torch.float32)
    draft_dir = save_draft(pair, scratch / f"draft-{name}", synthetic_tokenizer(pair.token_count))
    tokenizer = load_tokenizer(draft_dir)  # as the draft's loaders read it back: both pipelines must hold this one
    pair.draft = pair.draft.to(device)
    sync(device)
    entry["build_s"] = time.perf_counter() - start
    entry["draft_params"] = sum(p.numel() for p in pair.draft.parameters())
    entry["target_params"] = sum(p.numel() for p in pair.target.parameters())
    log(f"{name}: built in {entry['build_s']:.1f} s (draft {size(entry['draft_params'])}, target {size(entry['target_params'])} on {device})")

    target = HFModel(pair.target, f"synthetic-{target_shape}")
    pipes = {
        "device": synthetic_pipeline(target, HFModel(pair.draft, f"synthetic-{draft_shape}@{device.type}"), tokenizer=tokenizer),
        "cpu": synthetic_pipeline(target, draft_dir, tokenizer=tokenizer, draft_device="cpu", draft_dtype=torch.float32),
    }
    try:
        vocab = pair.vocab_size
        calibration_prompts = random_prompts(args.calibration_prompts, args.prompt_len, vocab, seed=1)
        prompts = [p.tolist() for p in random_prompts(args.prompts, args.prompt_len, vocab, seed=100)]
        warm = random_prompts(1, args.prompt_len, vocab, seed=99)[0].tolist()

        # Set-up of each method: cost measurements, duo's split and draft process, kernels.
        entry["setup_s"] = {}
        for label, pipe_key, method in METHODS:
            start = time.perf_counter()
            pipes[pipe_key].generate(warm, method=method, max_new_tokens=8)
            sync(device)
            entry["setup_s"][label] = time.perf_counter() - start
            log(f"{name}: {label} set up in {entry['setup_s'][label]:.1f} s")
        runtime = pipes["cpu"].duo_runtime()
        entry["duo"] = {
            "split": runtime.split.label if runtime.split else None,
            "report": list(runtime.report),
            "planner": runtime.planner(None).describe() if runtime.costs else None,
            "target_pass_s": runtime.costs.target_pass_seconds if runtime.costs else None,
            "draft_step_s": runtime.costs.draft_step_seconds if runtime.costs else None,
        }
        entry["sd_draft_step_device_s"] = pipes["device"].costs.draft_step_seconds()
        entry["sd_draft_step_cpu_s"] = pipes["cpu"].costs.draft_step_seconds()
        entry["target_t1_s"] = pipes["device"].costs.target_profile().target_pass(1)
        log(f"{name}: duo split {entry['duo']['split']}")
        save()

        known: dict[float, float] = {}
        entry["calibration"] = {"points": known, "alphas": {}}
        pair_deadline = deadline
        alpha_seconds = None
        for alpha_wanted in args.alphas:
            left = pair_deadline - time.perf_counter()
            if alpha_seconds is not None and left < 1.2 * alpha_seconds:
                entry["skipped"].append(f"alpha {alpha_wanted}: {left:.0f} s left of the time budget")
                log(f"{name}: alpha {alpha_wanted} skipped (time)")
                continue
            alpha_start = time.perf_counter()
            mix, alpha = calibrate_mix(pair, alpha_wanted, calibration_prompts, args.calibration_new_tokens, tolerance=args.tolerance, known=known, batch_size=args.calibration_batch)
            entry["calibration"]["alphas"][str(alpha_wanted)] = {"mix": mix, "alpha": alpha, "seconds": time.perf_counter() - alpha_start}
            log(f"{name}: alpha {alpha_wanted}: mix {mix:.4f} measures {alpha:.3f} ({time.perf_counter() - alpha_start:.1f} s)")
            for index, prompt in enumerate(prompts):
                reference = None
                for label, pipe_key, method in METHODS:
                    tokens, row = run_row(pipes[pipe_key], method, prompt, args.new_tokens)
                    if label == "ar":
                        reference = tokens
                    identical = tokens == reference
                    row.update(pair=name, alpha_wanted=alpha_wanted, alpha_calibrated=alpha, mix=mix, method=label, prompt=index, identical_to_ar=identical)
                    if not identical:
                        row["divergence"] = divergence(pair.target, prompt, reference, tokens)
                        log(f"{name} {label}: differs from ar at token {row['divergence']['first_difference']} (top-2 margin {row['divergence']['top2_margin']:.3g})")
                    report["rows"].append(row)
                    log(
                        f"{name} alpha {alpha_wanted} {label:13s} prompt {index}: {row['tokens_per_second']:7.1f} tok/s, TTFT {row['ttft_seconds'] * 1000:6.1f} ms, "
                        f"{row['tokens_per_pass']:.2f} tokens/pass{'' if identical else ', DIFFERS from ar'}"
                    )
            alpha_seconds = time.perf_counter() - alpha_start
            report["summary"] = summarise(report["rows"])
            save()
        if device.type == "cuda":
            entry["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    finally:
        for pipe in pipes.values():
            pipe.close()
        del pipes, target, pair
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--tiny", action="store_true", help="the tiny pair on the CPU (CI): every method end to end in well under a minute")
    parser.add_argument("--pairs", default=None, help=f"comma-separated, of: {', '.join(PAIRS)} (default: {', '.join(GPU_PAIRS)}; --tiny: tiny)")
    parser.add_argument("--alphas", default=",".join(map(str, ALPHAS)))
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per answer (default 96; --tiny 48)")
    parser.add_argument("--prompts", type=int, default=None, help="answers per method, pair and alpha (default 1: all three pairs fit ten minutes; more with --pairs)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--calibration-prompts", type=int, default=None, help="random prompts alpha is calibrated on (default 128; --tiny 48)")
    parser.add_argument("--calibration-new-tokens", type=int, default=24)
    parser.add_argument("--calibration-batch", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=0.015, help="calibration stops within this of the wanted alpha")
    parser.add_argument("--reserve-s", type=float, default=120.0, help="seconds kept for each later pair (its set-up and one alpha)")
    parser.add_argument("--target-dtype", choices=("bfloat16", "float16", "float32"), default=None, help="default bfloat16 on the GPU, float32 with --tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=None, help="start no alpha or pair that would end after this many seconds (default 520; --tiny 300)")
    args = parser.parse_args()
    args.alphas = [float(a) for a in args.alphas.split(",")]
    pairs = args.pairs.split(",") if args.pairs else (["tiny"] if args.tiny else list(GPU_PAIRS))
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        parser.error(f"unknown pair(s) {unknown}; choose from {', '.join(PAIRS)}")
    tiny_defaults = dict(new_tokens=48, prompts=1, calibration_prompts=48, budget_s=300.0)
    gpu_defaults = dict(new_tokens=96, prompts=1, calibration_prompts=128, budget_s=520.0)
    for key, value in (tiny_defaults if args.tiny else gpu_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.tiny:
        # One core: duo then measures one thread placement (each candidate costs a draft-process start),
        # and the run takes the same time on a 2-core laptop and a 64-core CI runner.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        torch.set_num_threads(1)
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        print("needs a CUDA GPU; use --tiny for the CPU run", file=sys.stderr)
        return 2
    if args.target_dtype:
        dtype = getattr(torch, args.target_dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers

    report: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tiny": args.tiny,
        "target_dtype": str(dtype).removeprefix("torch."),
        "draft_dtype": "float32",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "methods": [label for label, _, _ in METHODS],
        "pairs": {},
        "rows": [],
        "summary": [],
    }
    path = args.out / "duo_gpu.json"

    def save() -> None:
        report["greedy_duo_equals_ar"] = all(r["identical_to_ar"] for r in report["rows"] if r["method"] == "duo") and any(r["method"] == "duo" for r in report["rows"])
        report["total_s"] = time.perf_counter() - START
        path.write_text(json.dumps(report, indent=1, default=str))

    log(f"{report['device']}, torch {report['torch']}, transformers {report['transformers']}; pairs {pairs}, alphas {args.alphas}")
    deadline = START + args.budget_s
    with tempfile.TemporaryDirectory(prefix="duo_gpu-") as scratch:
        # Measured costs go to a fresh cache: no figure from an earlier run (or for another machine) is reused.
        os.environ["DUOSPEC_CACHE"] = str(Path(scratch) / "cache")
        for position, name in enumerate(pairs):
            left = deadline - time.perf_counter()
            if left < 60 and not args.tiny:
                report["pairs"][name] = {"skipped": [f"{left:.0f} s left of the time budget"]}
                log(f"{name}: skipped (time)")
                continue
            # This pair may use what the later pairs do not need for their set-up and one alpha each.
            pair_deadline = deadline - args.reserve_s * (len(pairs) - position - 1)
            try:
                run_pair(name, args, device, dtype, Path(scratch), report, save, pair_deadline)
            except Exception as error:  # keep going: the other pairs are still worth having
                report["pairs"].setdefault(name, {})["error"] = repr(error)
                log(f"{name} FAILED: {error!r}")
            report["summary"] = summarise(report["rows"])
            save()
    save()
    (args.out / "duo_gpu.md").write_text(markdown(report))
    print()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
