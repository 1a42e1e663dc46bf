"""Where a llama.cpp draft step's time goes: a bare `llama_decode` against duospec's draft step.

    python scripts/draft_step_profile.py [--model qwen2.5-coder-0.5b-instruct] [--steps 40] [--context 256]

Rows (median seconds of one single-token step after `--context` cached tokens, plus the greedy token):
- bare llama_decode: llama-cpp-python's low-level API with llama.cpp's default context (1 sequence),
  the argmax read straight from llama.cpp's logits buffer;
- LlamaCppModel, sequences=S: duospec's backend as a draft, forward(last_only) and an argmax on the
  returned row, for the sequence-id counts duospec uses (256 for trees) and 1..2;
- ChainDrafter step: one greedy draft token through the drafter (catch-up and argmax included).
The machine must be quiet: two processes timing at once measure each other.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import numpy as np
import torch

from duospec.budget.policy import DraftBudget
from duospec.config import SamplingConfig
from duospec.drafting.chain import ChainDrafter
from duospec.models.llamacpp import LlamaCppModel, LlamaCppSettings
from duospec.models.registry import EMBEDDED_MODELS, ensure_gguf
from duospec.verify import Verdict


def bare_decode(path: str, context: int, steps: int, threads: int) -> float:
    import llama_cpp

    silence = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(silence, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 4096, 512, 512
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    memory = llama_cpp.llama_get_memory(ctx)
    vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(tokens: list[int], start: int) -> None:
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = token, start + i, 1, 0
            batch.logits[i] = i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        assert llama_cpp.llama_decode(ctx, batch) == 0

    decode([i % (vocab - 1) for i in range(context)], 0)
    times = []
    for step in range(steps + 3):
        start = time.perf_counter()
        decode([step % 97], context)
        int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(vocab,))))
        times.append(time.perf_counter() - start)
        llama_cpp.llama_memory_seq_rm(memory, 0, context, -1)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return statistics.median(times[3:])


def duospec_forward(path: str, context: int, steps: int, threads: int, sequences: int) -> float:
    model = LlamaCppModel(path, LlamaCppSettings(threads=threads, sequences=sequences))
    filler = torch.arange(context) % (model.vocab_size - 1)
    model.forward(filler, last_only=True)
    times = []
    for step in range(steps + 3):
        start = time.perf_counter()
        int(model.forward(torch.tensor([step % 97]), last_only=True).argmax(-1))
        times.append(time.perf_counter() - start)
        model.crop(context)
    model.close()
    return statistics.median(times[3:])


def drafter_step(path: str, context: int, steps: int, threads: int) -> float:
    model = LlamaCppModel(path, LlamaCppSettings(threads=threads))
    drafter = ChainDrafter(model, model.vocab_size)
    tokens = [i % (model.vocab_size - 1) for i in range(context)]
    drafter.propose(tokens, DraftBudget(1), SamplingConfig(), None)  # catches up on the context
    drafter.feedback(Verdict(path=[0], next_token=0))
    times = []
    for step in range(steps + 3):
        start = time.perf_counter()
        drafter.propose([*tokens, step % 97], DraftBudget(1), SamplingConfig(), None)  # one new root, one draft token
        times.append(time.perf_counter() - start)
        drafter.feedback(Verdict(path=[0], next_token=0))  # the draft token rejected: the cache is valid up to the root
    model.close()
    return statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    path = str(ensure_gguf(EMBEDDED_MODELS[args.model])) if args.model in EMBEDDED_MODELS else args.model
    threads = args.threads or LlamaCppSettings().resolved_threads()
    rows = [("bare llama_decode (1 sequence)", bare_decode(path, args.context, args.steps, threads))]
    for sequences in (256, 2):
        rows.append((f"LlamaCppModel.forward, sequences={sequences}", duospec_forward(path, args.context, args.steps, threads, sequences)))
    rows.append(("ChainDrafter greedy step (sequences=256)", drafter_step(path, args.context, args.steps, threads)))
    bare = rows[0][1]
    print(f"| step ({args.model}, {threads} threads, {args.context} cached) | seconds | vs bare |")
    print("|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.4f} | {seconds / bare:.2f}x |")


if __name__ == "__main__":
    main()
