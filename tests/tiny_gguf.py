"""Write tiny random Qwen2 models as GGUF files, so the llama.cpp backend is tested without the 1.5B model.

The file holds exactly the weights of a `tiny_models.tiny_model` (float32, so llama.cpp and transformers
compute the same function up to rounding) and the same character-level vocabulary, so one GGUF file
loads in both backends and their logits can be compared.

Reasons for the choices:
(a) architecture "qwen2": llama.cpp applies Qwen2's rotary embedding (NEOX style) to the q/k weights as
    transformers stores them; the "llama" architecture would need its rows permuted;
(b) float32 tensors: no quantisation error, so greedy identity between backends is a fair test;
(c) the character vocabulary of tiny_models with one merge (see write_gguf): a valid "gpt2" tokenizer
    for both loaders, giving the same ids as tiny_models' tokenizer for any text without ":\n" or "W".
"""

from __future__ import annotations

from pathlib import Path

import gguf
from tiny_models import CHAT_TEMPLATE, EOS_ID, SPECIALS, tiny_tokenizer
from transformers import Qwen2ForCausalLM

MERGE = (":", "Ċ")
MERGED_TOKEN = "".join(MERGE)


def write_gguf(model: Qwen2ForCausalLM, path: str | Path, *, chat: bool = True, name: str = "tiny-qwen2") -> Path:
    """Save `model` (a tiny Qwen2 from tiny_models) with its tokenizer as a float32 GGUF file."""
    path = Path(path)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokenizer = tiny_tokenizer(config.vocab_size, chat=chat)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    if [index for _, index in vocab] != list(range(config.vocab_size)):
        raise ValueError("the tiny vocabulary must cover ids 0..V-1")
    # llama.cpp refuses a "gpt2" vocabulary without merges, the GGUF writer drops an empty list, and
    # transformers refuses a merge whose result is not a token: so the last id (an upper-case letter
    # no test uses) becomes the merged token ":Ċ" (a colon before a newline).
    vocab[-1] = (MERGED_TOKEN, vocab[-1][1])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types(
        [gguf.TokenType.CONTROL if token in SPECIALS else gguf.TokenType.NORMAL for token, _ in vocab]
    )
    writer.add_token_merges([" ".join(MERGE)])
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    if chat:
        writer.add_chat_template(CHAT_TEMPLATE)

    for name_, tensor in _gguf_tensors(model):
        writer.add_tensor(name_, tensor.detach().float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_tensors(model: Qwen2ForCausalLM):
    """(GGUF name, tensor) pairs in llama.cpp's naming for the qwen2 architecture."""
    state = model.state_dict()
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    for layer in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        block = f"blk.{layer}."
        yield block + "attn_norm.weight", state[prefix + "input_layernorm.weight"]
        for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
            yield block + ours + ".weight", state[prefix + f"self_attn.{theirs}.weight"]
            yield block + ours + ".bias", state[prefix + f"self_attn.{theirs}.bias"]
        yield block + "attn_output.weight", state[prefix + "self_attn.o_proj.weight"]
        yield block + "ffn_norm.weight", state[prefix + "post_attention_layernorm.weight"]
        yield block + "ffn_gate.weight", state[prefix + "mlp.gate_proj.weight"]
        yield block + "ffn_up.weight", state[prefix + "mlp.up_proj.weight"]
        yield block + "ffn_down.weight", state[prefix + "mlp.down_proj.weight"]
    yield "output_norm.weight", state["model.norm.weight"]
    yield "output.weight", state["lm_head.weight"]
