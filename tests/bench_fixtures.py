"""Tiny in-memory models and a real (tiny) tokenizer for the benchmark tests.

The bench needs text in and text out (chat template, multi-turn prompts that quote the first answer),
so the tokenizer is a genuine byte-level BPE trained in memory on a few Spec-Bench questions: every
string round-trips, nothing is downloaded. The models are random float32 Qwen2s, the draft being the
target with perturbed weights, so speculative methods accept some drafts and reject others.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 384
TASK_CATEGORIES = {  # one category per Spec-Bench task, as in question.jsonl
    "mt_bench": "writing",
    "translation": "translation",
    "summarization": "summarization",
    "qa": "qa",
    "math_reasoning": "math_reasoning",
    "rag": "rag",
}


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE over a small vocabulary with a chat template; `<|im_end|>` is EOS.

    Cached: training takes a second, and nothing mutates a tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [question["turns"][0] for question in _packaged_questions()[::12]]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_models(vocab_size: int, noise: float = 0.02, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(target, draft): random Qwen2 causal LMs; the draft is the target plus Gaussian weight noise.

    initializer_range 0.2 (not the default 0.02) spreads the logits, so exact ties between the top two
    tokens, which would make greedy identity depend on rounding, are vanishingly rare.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    target = Qwen2ForCausalLM(config).eval()
    draft = Qwen2ForCausalLM(config).eval()
    draft.load_state_dict(target.state_dict())
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(noise * torch.randn_like(parameter))
    return target, draft


def tiny_pipeline(noise: float = 0.02):
    """A Pipeline over the tiny target with the tiny draft attached (float32, one thread)."""
    from duospec.api import Pipeline
    from duospec.models.hf import HFModel

    tokenizer = tiny_tokenizer()
    target, draft = tiny_models(len(tokenizer), noise)
    pipe = Pipeline(
        HFModel(target), tokenizer, draft_source=None, device=torch.device("cpu"), dtype=torch.float32, threads=1, progress=False
    )
    pipe.attach_draft(HFModel(draft))
    return pipe


def write_small_questions(path: Path, per_task: int = 2, max_chars: int = 400) -> Path:
    """A question file in Spec-Bench's format: `per_task` questions of each task, prompts shortened
    (and the multi-turn ones kept two-turn) so a tiny-model run takes seconds."""
    questions = _packaged_questions()
    lines = []
    for category in TASK_CATEGORIES.values():
        chosen = [q for q in questions if q["category"] == category][:per_task]
        for question in chosen:
            turns = [turn[-max_chars:] for turn in question["turns"]]
            lines.append(json.dumps({"question_id": question["question_id"], "category": category, "turns": turns}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _packaged_questions() -> list[dict]:
    from duospec.bench.data import packaged_questions_path

    with packaged_questions_path().open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: tiny matmuls split over two threads of a busy 2-core machine wait on
    each other (~20 ms a pass instead of ~1 ms), which would make the tests slow, not more thorough."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
