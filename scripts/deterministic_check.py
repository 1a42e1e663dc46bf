"""Deterministic mode on this machine: does it hold, and what does it cost? (README, "Deterministic mode")

    python scripts/deterministic_check.py --checkpoint DIR --out docs/bench/deterministic/cpu
    PYTHONPATH=. python3 scripts/deterministic_check.py --shape 1.5b --device cuda --out OUT   # random weights, no hub

1. Default mode: the largest logit difference between one pass over n tokens and n one-token decodes.
2. `set_deterministic(True)`: the load-time checks pass, or the refusal and its reason are recorded.
3. Where it holds: chains of several lengths and a branching tree, every row bit-identical to one-token
   decodes of the same prefix (a tree node's prefix: the context and its ancestors).
4. Cost: seconds of one pass over n tokens after `--context` cached tokens, default against deterministic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from duospec.config import DuospecError  # noqa: E402
from duospec.models.hf import HFModel, load_hf  # noqa: E402

SIZES = (1, 2, 4, 8, 16, 32, 64)
CHAINS = (2, 5, 8, 17, 33)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def largest_gap(model: HFModel, prefix: torch.Tensor, new: torch.Tensor) -> float:
    """max |logits| difference between one pass over `new` and one-token decodes of it."""
    model.reset()
    model.forward(prefix)
    batch = model.forward(new)
    model.crop(len(prefix))
    alone = torch.cat([model.forward(new[i : i + 1]) for i in range(len(new))])
    model.reset()
    return float((batch - alone).abs().max())


def tree_identical(model: HFModel, prefix: torch.Tensor, vocab: int) -> bool:
    """A 7-node tree (root, two children, each with two children) scored in one pass against one-token
    decodes of each node's own path."""
    parents = [-1, 0, 0, 1, 1, 2, 2]
    tokens = torch.randint(0, vocab, (len(parents),), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(len(parents), len(parents), dtype=torch.bool)
    depth = []
    for node, parent in enumerate(parents):
        mask[node, node] = True
        if parent >= 0:
            mask[node] |= mask[parent]
        depth.append(0 if parent < 0 else depth[parent] + 1)
    model.reset()
    model.forward(prefix)
    positions = len(prefix) + torch.tensor(depth)
    tree = model.forward(tokens, positions, mask)
    same = True
    for node in range(len(parents)):
        path = [n for n in range(len(parents)) if mask[node, n]]
        model.crop(len(prefix))
        for step in path:
            row = model.forward(tokens[step : step + 1])
        same &= torch.equal(row[0], tree[node])
    model.reset()
    return bool(same)


def pass_seconds(model: HFModel, context: torch.Tensor, n: int, repeats: int) -> float:
    model.reset()
    model.forward(context)
    tokens = torch.randint(0, model.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
    times = []
    for _ in range(repeats + 1):  # the first pass of a size warms its kernels up
        sync(model.device)
        start = time.perf_counter()
        model.forward(tokens)
        sync(model.device)
        times.append(time.perf_counter() - start)
        model.crop(len(context))
    model.reset()
    return statistics.median(times[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a transformers checkpoint directory")
    parser.add_argument("--shape", default=None, help="instead: random weights of this shape (offload_check.SHAPES, e.g. 1.5b)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--no-prompt-pass", action="store_true", help="skip timing the --context prompt's own pass in both modes")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if args.checkpoint:
        model, _ = load_hf(args.checkpoint, device=device, dtype=dtype)
        name = args.checkpoint
    else:
        from offload_check import build

        model = HFModel(build(args.shape, args.device, dtype), name=f"random {args.shape}")
        name = model.name
    report: dict = {"model": name, "device": str(device), "dtype": args.dtype, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "threads": torch.get_num_threads()}
    generator = torch.Generator().manual_seed(0)
    vocab = model.vocab_size
    context = torch.randint(0, vocab, (args.context,), generator=generator)
    prefix = context[:32]
    new = torch.randint(0, vocab, (8,), generator=generator)
    report["default_gap_8"] = largest_gap(model, prefix, new)
    print(f"default mode: 8-token pass vs decodes, largest logit gap {report['default_gap_8']:.4g}", flush=True)
    start = time.perf_counter()
    try:
        model.set_deterministic(True)
    except DuospecError as error:
        report["refused"] = str(error)
        print(f"deterministic mode refused: {error}", flush=True)
    report["enable_seconds"] = time.perf_counter() - start
    sizes = [int(size) for size in args.sizes.split(",")]
    if model.deterministic:
        report["chain_gaps"] = {n: largest_gap(model, prefix, torch.randint(0, vocab, (n,), generator=generator)) for n in CHAINS}
        report["tree_identical"] = tree_identical(model, prefix, vocab)
        print(f"deterministic: chain gaps {report['chain_gaps']}, tree identical {report['tree_identical']} (enable {report['enable_seconds']:.2f} s)", flush=True)
    prompt = {}
    for mode in () if args.no_prompt_pass else (False, True) if "refused" not in report else (False,):
        model.set_deterministic(mode)
        times = []
        for _ in range(2):
            model.reset()
            sync(model.device)
            start = time.perf_counter()
            model.forward(context, last_only=True)
            sync(model.device)
            times.append(time.perf_counter() - start)
        prompt["deterministic_s" if mode else "default_s"] = min(times)
    report["prompt_pass"] = {"tokens": args.context, **prompt}
    print(json.dumps(report["prompt_pass"]), flush=True)
    costs = []
    for n in sizes:
        row = {"n": n}
        model.set_deterministic(False)
        row["default_s"] = pass_seconds(model, context, n, args.repeats)
        if "refused" not in report:
            model.set_deterministic(True)
            row["deterministic_s"] = pass_seconds(model, context, n, args.repeats)
            row["ratio"] = row["deterministic_s"] / row["default_s"]
        costs.append(row)
        print(json.dumps(row), flush=True)
    report["costs"] = costs
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deterministic.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
