"""The AMX probe's child process (see amx_probe.py): load a GGUF with llama.cpp's repacked weights and
decode a 32-token batch (the AMX kernels' case) and one token. Exit 0 when that worked; a build that
miscompiled its AMX kernels dies here instead of in the user's process. Run as a script, so it
imports llama_cpp alone."""

from __future__ import annotations

import sys


def probe(model_path: str) -> int:
    """The child: load with repacked weights, decode a 32-token batch (the AMX kernels' case) and one token."""
    import llama_cpp

    silence = llama_cpp.llama_log_callback(lambda level, text, data: None)  # referenced while llama.cpp may call it
    llama_cpp.llama_log_set(silence, None)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = True
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), params)
    if not model:
        print("llama.cpp could not load the model", file=sys.stderr)
        return 3
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx = 128
    context_params.n_batch = context_params.n_ubatch = 64
    context = llama_cpp.llama_init_from_model(model, context_params)
    if not context:
        print("llama.cpp could not create a context", file=sys.stderr)
        return 3
    vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
    for start, count in ((0, 32), (32, 1)):
        batch = llama_cpp.llama_batch_init(count, 0, 1)
        for i in range(count):
            batch.token[i] = (start + i) % vocab
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == count - 1
        batch.n_tokens = count
        if llama_cpp.llama_decode(context, batch) != 0:
            print("llama_decode failed", file=sys.stderr)
            return 4
        llama_cpp.llama_batch_free(batch)
    return 0


if __name__ == "__main__":
    sys.exit(probe(sys.argv[1]))
