"""Check and time `--offload` (duospec/models/offload.py) on a CUDA GPU, with random-weight models.

    PYTHONPATH=. python3 scripts/offload_check.py --out DIR     # on a CUDA machine (under 6 minutes)
    PYTHONPATH=. python3 scripts/offload_check.py --dry-run     # on a CPU: the script's own logic

Models are built from configs with the shapes of Qwen2.5-1.5B and Qwen2.5-7B and random weights, so
nothing is downloaded. Parts:
(a) identity: a small float32 model offloaded vs the same weights resident on the GPU: logits of a
    prompt pass, a chain pass and a tree pass (4-D tree mask), and 64 greedy tokens;
(b) cost: one `HFModel.forward` over n new tokens after a 256-token KV cache, n = 1 ... 2048, for the
    7B shape in bfloat16, resident on the GPU and offloaded (then the 1.5B shape if time is left);
    median of 3 after a warm-up, timed between `torch.cuda.synchronize()` calls. Also the raw copy
    bandwidth of one pinned layer buffer to the GPU, and peak GPU memory.
Writes offload_check.json to --out (after every stage, so a run cut short keeps what it measured)
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.initialization import no_init_weights

from duospec.config import DuospecError
from duospec.models.hf import HFModel
from duospec.models.offload import offload_layers, offload_memory
from duospec.tree import TokenTree

SHAPES = {
    # Qwen2.5-7B and Qwen2.5-1.5B as published (config.json), with random weights.
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # The identity check: 5 layers (odd: the last layer and the next pass's first share a staging buffer).
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}
NS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
CONTEXT = 256
REPEATS = 3
TREE = TokenTree(torch.tensor([4, 8, 9, 30, 31, 32, 40]), (-1, 0, 0, 1, 2, 2, 3))
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def build(shape: str, device: str, dtype: torch.dtype, seed: int = 0, head_std: float = 0.02) -> Qwen2ForCausalLM:
    """A model of `shape` with random weights, built on `device` without transformers' slow CPU init."""
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    with no_init_weights(), torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    if config.tie_word_embeddings:
        model.tie_weights()
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, head_std if name == "lm_head.weight" else 0.02, generator=generator)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def identity_check(device: str, dtype: torch.dtype, shape: str) -> dict:
    """Offloaded vs resident logits (prompt, chain, tree, twice) and 64 greedy tokens."""
    cpu_model = build(shape, "cpu", dtype, seed=1, head_std=0.5)  # a sharp head: no near-ties in greedy
    resident = HFModel(build(shape, "cpu", dtype, seed=1, head_std=0.5).to(device))
    offloaded = HFModel(offload_layers(cpu_model, torch.device(device)))
    generator = torch.Generator().manual_seed(3)
    vocab = SHAPES[shape]["vocab_size"]
    prompt = torch.randint(0, vocab, (32,), generator=generator)
    chain = torch.randint(0, vocab, (8,), generator=generator)
    diffs = {}
    for round_ in range(2):  # round 2 starts from the prefetched first layer
        for model in (resident, offloaded):
            model.reset()
        steps = {
            "prompt": lambda m: m.forward(prompt),
            "chain": lambda m: m.forward(chain),
            "tree": lambda m: m.forward(TREE.tokens, m.cache_len + TREE.depth_tensor(), TREE.ancestor_mask()),
        }
        for name, step in steps.items():
            expected, got = step(resident), step(offloaded)
            diffs[f"{name}_{round_}"] = (got - expected).abs().max().item()
    tokens = {}
    for label, model in (("resident", resident), ("offloaded", offloaded)):
        model.reset()
        logits = model.forward(prompt)
        out = []
        for _ in range(64):
            out.append(int(logits[-1].argmax()))
            logits = model.forward(torch.tensor([out[-1]]))
        tokens[label] = out
    return {
        "shape": shape,
        "dtype": str(dtype),
        "max_abs_logit_diff": diffs,
        "logits_equal": all(d == 0.0 for d in diffs.values()),
        "greedy_identical": tokens["resident"] == tokens["offloaded"],
        "greedy_tokens": tokens["offloaded"][:16],
        "memory": offload_memory(offloaded.model).to_dict(),
    }


def time_passes(model: HFModel, ns: list[int], vocab: int, deadline: float, keep_logits: tuple[int, ...] = (1, 16)) -> dict:
    """Median seconds of one forward over n new tokens after a CONTEXT-token cache, per n."""
    device = model.device
    generator = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, vocab, (CONTEXT,), generator=generator)
    model.reset()
    model.forward(prefix)
    sync(device)
    result, kept = {}, {}
    for n in ns:
        if time.perf_counter() > deadline:
            log(f"  deadline: n >= {n} skipped")
            break
        tokens = torch.randint(0, vocab, (n,), generator=generator)
        logits = model.forward(tokens)  # warm-up
        if n in keep_logits:
            kept[n] = logits.float().cpu()
        model.crop(CONTEXT)
        del logits
        samples = []
        for _ in range(REPEATS):
            sync(device)
            start = time.perf_counter()
            model.forward(tokens)
            sync(device)
            samples.append(time.perf_counter() - start)
            model.crop(CONTEXT)
        result[n] = {"median_s": statistics.median(samples), "samples_s": samples}
        log(f"  n={n:5d}: {result[n]['median_s'] * 1000:9.2f} ms")
    return {"times": result, "kept_logits": kept}


def copy_bandwidth(model: torch.nn.Module) -> float:
    """GB/s of one pinned layer buffer copied to its staging buffer (what a pass streams, layer by layer)."""
    streamer = model._duospec_offload
    packed, slot = streamer.packed[0], streamer.slots[0]
    slot[: packed.nbytes].copy_(packed.buffer, non_blocking=True)
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        slot[: packed.nbytes].copy_(packed.buffer, non_blocking=True)
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return packed.nbytes / statistics.median(samples) / 1e9


def cost_stage(shape: str, device: str, dtype: torch.dtype, deadline: float, resident_too: bool) -> dict:
    vocab = SHAPES[shape]["vocab_size"]
    stage: dict = {"shape": shape, "dtype": str(dtype), "context": CONTEXT, "repeats": REPEATS}
    start = time.perf_counter()
    model = build(shape, device, dtype)
    sync(torch.device(device))
    stage["params"] = sum(p.numel() for p in model.parameters())
    stage["build_s"] = time.perf_counter() - start
    log(f"{shape}: {stage['params'] / 1e9:.2f} B parameters built on {device} in {stage['build_s']:.1f} s")
    resident_logits = {}
    if resident_too:
        torch.cuda.reset_peak_memory_stats()
        log(f"{shape} resident on the GPU:")
        timed = time_passes(HFModel(model), NS, vocab, deadline)
        stage["resident"] = {"times": timed["times"], "peak_gpu_bytes": torch.cuda.max_memory_allocated()}
        resident_logits = timed["kept_logits"]
    start = time.perf_counter()
    model = model.to("cpu")
    torch.cuda.empty_cache()
    stage["to_cpu_s"] = time.perf_counter() - start
    start = time.perf_counter()
    offload_layers(model, torch.device(device))
    torch.cuda.synchronize()
    stage["offload_setup_s"] = time.perf_counter() - start
    memory = offload_memory(model)
    stage["memory"] = memory.to_dict()
    log(f"{shape}: offloaded in {stage['offload_setup_s']:.1f} s: {memory.pinned_bytes / 1e9:.2f} GB pinned, "
        f"{memory.gpu_resident_bytes / 1e9:.2f} GB resident + {memory.gpu_staging_bytes / 1e9:.2f} GB staging on the GPU")
    stage["copy_gb_per_s"] = copy_bandwidth(model)
    log(f"{shape}: one pinned layer copies to the GPU at {stage['copy_gb_per_s']:.1f} GB/s")
    torch.cuda.reset_peak_memory_stats()
    log(f"{shape} offloaded:")
    timed = time_passes(HFModel(model), NS, vocab, deadline)
    stage["offloaded"] = {"times": timed["times"], "peak_gpu_bytes": torch.cuda.max_memory_allocated()}
    for n, expected in resident_logits.items():
        got = timed["kept_logits"].get(n)
        if got is not None:
            stage.setdefault("offloaded_vs_resident", {})[n] = {
                "max_abs_logit_diff": (got - expected).abs().max().item(),
                "argmax_agree": float((got.argmax(-1) == expected.argmax(-1)).float().mean()),
            }
    del model
    torch.cuda.empty_cache()
    return stage


def table(stage: dict) -> str:
    memory = stage["memory"]
    lines = [
        f"{stage['shape']} shape, {stage['params'] / 1e9:.2f} B parameters, {stage['dtype']}, KV cache {stage['context']} tokens, median of {stage['repeats']}:",
        f"  pinned CPU {memory['pinned_bytes'] / 1e9:.2f} GB; GPU {memory['gpu_resident_bytes'] / 1e9:.2f} GB resident + {memory['gpu_staging_bytes'] / 1e9:.2f} GB staging; "
        f"one layer copies at {stage['copy_gb_per_s']:.1f} GB/s",
        "      n | offloaded ms | t(n)/t(1) |  GB/s | resident ms | t(n)/t(1)",
    ]
    off = stage["offloaded"]["times"]
    res = stage.get("resident", {}).get("times", {})
    for n in NS:
        if n not in off:
            continue
        t, t1 = off[n]["median_s"], off[min(off)]["median_s"]
        row = f"  {n:5d} | {t * 1000:12.1f} | {t / t1:9.2f} | {memory['pinned_bytes'] / t / 1e9:5.1f}"
        if n in res:
            r, r1 = res[n]["median_s"], res[min(res)]["median_s"]
            row += f" | {r * 1000:11.2f} | {r / r1:9.2f}"
        lines.append(row)
    peaks = f"  peak GPU memory: offloaded {stage['offloaded']['peak_gpu_bytes'] / 2**30:.2f} GiB"
    if "resident" in stage:
        peaks += f", resident {stage['resident']['peak_gpu_bytes'] / 2**30:.2f} GiB"
    lines.append(peaks)
    for n, check in stage.get("offloaded_vs_resident", {}).items():
        lines.append(f"  n={n}: offloaded vs resident max |logit diff| {check['max_abs_logit_diff']:.3g}, argmax agreement {check['argmax_agree']:.3f}")
    return "\n".join(lines)


def dry_run(out: Path) -> None:
    """On a CPU: offloading is refused with the DuospecError; the timing loop and report run on a tiny model."""
    global NS, CONTEXT
    report: dict = {"dry_run": True}
    try:
        offload_layers(build("tiny", "cpu", torch.float32), torch.device("cpu"))
        report["refusal"] = None
    except DuospecError as error:
        report["refusal"] = str(error)
    log(f"offload on the CPU: {report['refusal']}")
    NS, CONTEXT = [1, 2, 4, 8, 16], 16
    model = HFModel(build("tiny", "cpu", torch.float32))
    timed = time_passes(model, NS, SHAPES["tiny"]["vocab_size"], time.perf_counter() + 60)
    report["tiny_cpu_times"] = timed["times"]
    (out / "offload_check.json").write_text(json.dumps(report, indent=1))
    assert report["refusal"] and "--offload needs a CUDA GPU" in report["refusal"], report["refusal"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--dry-run", action="store_true", help="CPU only: check the refusal and the timing logic on a tiny model")
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop timing new sizes after this many seconds")
    parser.add_argument("--no-resident", action="store_true", help="time the offloaded model only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        dry_run(args.out)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU here; use --dry-run", file=sys.stderr)
        return 2
    device = "cuda"
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "host": platform.node(),
        "stages": {},
    }
    path = args.out / "offload_check.json"

    def save() -> None:
        path.write_text(json.dumps(report, indent=1, default=str))

    log(f"{report['device']}, torch {report['torch']}, transformers {report['transformers']}")
    deadline = START + args.budget_s
    try:
        report["identity"] = identity_check(device, torch.float32, "small")
        log(f"identity (small, float32): {json.dumps({k: v for k, v in report['identity'].items() if k != 'memory'})}")
    except Exception as error:  # keep going: the timings are still worth having
        report["identity"] = {"error": repr(error)}
        log(f"identity check FAILED: {error!r}")
    save()
    for shape in ("7b", "1.5b"):
        if shape != "7b" and time.perf_counter() > START + 0.6 * args.budget_s:
            log(f"{shape}: skipped (time)")
            continue
        try:
            report["stages"][shape] = cost_stage(shape, device, torch.bfloat16, deadline, resident_too=not args.no_resident)
        except Exception as error:
            report["stages"][shape] = {"error": repr(error)}
            log(f"{shape} FAILED: {error!r}")
        save()
    report["total_s"] = time.perf_counter() - START
    save()
    print()
    print(f"{report['device']} (torch {report['torch']}, transformers {report['transformers']})")
    identity = report["identity"]
    if "error" not in identity:
        print(f"identity ({identity['shape']}, {identity['dtype']}): logits equal {identity['logits_equal']} "
              f"(max |diff| {max(identity['max_abs_logit_diff'].values()):.3g}), greedy 64 tokens identical {identity['greedy_identical']}")
    for stage in report["stages"].values():
        print(table(stage) if "error" not in stage else stage)
    print(f"total {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
