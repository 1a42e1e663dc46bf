"""Tiny random models and a character-level tokenizer, built in memory in milliseconds.

Reasons for the constants:
(a) float32 everywhere, so a multi-token pass rounds like a one-token pass and greedy identity is exact;
(b) vocabulary 64 (characters) keeps argmax ties impossible in practice yet makes random drafts nearly
    always wrong;
(c) "perturbed" drafts are the target plus weight noise small enough that about half the drafts are
    accepted, so partial acceptance and cache trimming really run.
"""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

from duospec.api import Pipeline
from duospec.models.hf import HFModel

SPECIALS = ["<|endoftext|>", "<eos>"]
VOCAB_SIZE = 64
EOS_ID = 1
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# Byte-level symbols: "Ġ" is a space, "Ċ" a newline (the GPT-2 byte-to-unicode map that Qwen uses).
_CHARACTERS = ["Ġ", "Ċ", ":"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
_CHARACTERS += [chr(c) for c in range(ord("A"), ord("Z") + 1)]


def tiny_tokenizer(vocab_size: int = VOCAB_SIZE, chat: bool = True) -> Qwen2Tokenizer:
    """A character-level Qwen2Tokenizer (byte-level BPE without merges): every character is a token.

    Being a real Qwen2Tokenizer, it survives save_pretrained / from_pretrained next to a Qwen2 config,
    which transformers 5 otherwise forces to Qwen2Tokenizer.
    """
    symbols = (SPECIALS + _CHARACTERS)[:vocab_size]
    tokenizer = Qwen2Tokenizer(
        vocab={symbol: index for index, symbol in enumerate(symbols)},
        merges=[],
        unk_token="<|endoftext|>",
        eos_token="<eos>",
        pad_token="<|endoftext|>",
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(vocab_size: int = VOCAB_SIZE, max_positions: int = 256, layers: int = 2) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=EOS_ID,
        bos_token_id=None,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def tiny_model(seed: int, vocab_size: int = VOCAB_SIZE, max_positions: int = 256) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(vocab_size, max_positions)).float().eval()
    # Random init gives nearly uniform logits; sharpen them so the model has preferences like a real one.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def perturbed(model: Qwen2ForCausalLM, noise: float, seed: int) -> Qwen2ForCausalLM:
    """A copy of `model` with Gaussian noise on every weight: a draft that is partly right."""
    generator = torch.Generator().manual_seed(seed)
    copy = Qwen2ForCausalLM(model.config).float().eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for parameter in copy.parameters():
            parameter.add_(noise * parameter.std() * torch.randn(parameter.shape, generator=generator))
    return copy


def tiny_pipeline(target: Qwen2ForCausalLM, draft: Qwen2ForCausalLM | None = None, chat: bool = True) -> Pipeline:
    pipe = Pipeline(
        HFModel(target),
        tiny_tokenizer(target.config.vocab_size, chat=chat),
        draft_source=None,
        device=torch.device("cpu"),
        dtype=torch.float32,
        threads=torch.get_num_threads(),
    )
    if draft is not None:
        pipe.attach_draft(HFModel(draft))
    return pipe
