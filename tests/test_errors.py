"""Bad input gets a clear DuospecError naming the problem and the fix; Ctrl-C keeps what was generated."""

from __future__ import annotations

import pytest
import torch

from duospec.api import GenerationInterrupted, check_same_vocabulary
from duospec.config import DuospecError, GenerationRequest, SamplingConfig
from duospec.models.hf import load_hf, resolve_device, resolve_dtype
from tiny_models import tiny_model, tiny_pipeline, tiny_tokenizer


@pytest.fixture(scope="module")
def pipe():
    target = tiny_model(seed=0, max_positions=32)
    return tiny_pipeline(target, target)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(top_p=1.5), "top_p must be in (0, 1]"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(lenience=0.0), "lenience must be in (0, 1]"),
        (dict(lenience=1.2), "lenience must be in (0, 1]"),
        (dict(method="beam"), "unknown method 'beam'; choose one of: ar, auto, duo, multiseq, pld, sd"),
        (dict(gamma=0), "gamma (draft tokens per round) must be an integer in 1..64"),
        (dict(method="ar", lenience=0.5), "lenience only applies to speculative methods"),
    ],
)
def test_bad_options_name_the_knob(pipe, options, message):
    with pytest.raises(DuospecError) as error:
        pipe.generate("w1 w2", **options)
    assert message in str(error.value)


@pytest.mark.parametrize("prompt", ["", "   \n", []])
def test_empty_prompt(pipe, prompt):
    with pytest.raises(DuospecError, match="empty|non-empty"):
        pipe.generate(prompt)


def test_prompt_longer_than_context(pipe):
    with pytest.raises(DuospecError, match=r"the prompt has \d+ tokens but the target's context holds 32; shorten the prompt"):
        pipe.generate("w" * 40)


def test_token_ids_out_of_range(pipe):
    with pytest.raises(DuospecError, match=r"list of ints in \[0, 64\)"):
        pipe.generate([1, 2, 64])


def test_chat_without_template():
    pipe = tiny_pipeline(tiny_model(seed=0), chat=False)
    with pytest.raises(DuospecError, match="no chat template; pass --no-chat"):
        pipe.generate("w1", method="ar", chat=True)
    assert pipe.generate("w1", method="ar", max_new_tokens=2).token_ids  # no template: plain text is used


def test_vocabulary_mismatch_is_refused():
    with pytest.raises(DuospecError, match="do not share a tokenizer") as error:
        check_same_vocabulary(tiny_tokenizer(64), tiny_tokenizer(48), "t", "d")
    assert "Pick a draft from the target's model family" in str(error.value)
    check_same_vocabulary(tiny_tokenizer(64), tiny_tokenizer(64), "t", "d")  # same vocabulary passes


def test_missing_draft_for_sd():
    pipe = tiny_pipeline(tiny_model(seed=0))
    with pytest.raises(DuospecError, match="needs a draft model; pass --draft"):
        pipe.generate("w1", method="sd")
    assert pipe.generate("w1", method="pld", max_new_tokens=3).token_ids  # pld needs none


def test_missing_model_directory(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Fail at once instead of retrying a network that is not there (the flag is read at import time).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DuospecError, match="holds no config.json"):
        load_hf(tmp_path, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(DuospecError, match="neither a local transformers checkpoint nor a hub id"):
        load_hf("no-such-org/no-such-model-xyz", device=torch.device("cpu"), dtype=torch.float32)


def test_corrupt_model_files(tmp_path):
    tiny_model(seed=0).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DuospecError, match="If its files are damaged or incomplete, download or convert it again"):
        load_hf(tmp_path, device=torch.device("cpu"), dtype=torch.float32)


def test_bad_device_and_dtype():
    with pytest.raises(DuospecError, match="unknown dtype 'int4'"):
        resolve_dtype("int4")
    with pytest.raises(DuospecError, match="unknown device"):
        resolve_device("tpu:9")
    if not torch.cuda.is_available():
        with pytest.raises(DuospecError, match="no CUDA GPU; use --device cpu"):
            resolve_device("cuda")


def test_sampling_and_request_configs_validate_directly():
    with pytest.raises(DuospecError, match="seed must be an integer"):
        SamplingConfig(seed="7")
    with pytest.raises(DuospecError, match="max_new_tokens"):
        GenerationRequest(max_new_tokens=1.5)


class InterruptAfter:
    """A forward hook that raises KeyboardInterrupt on the n-th target pass, as Ctrl-C would mid-pass."""

    def __init__(self, passes: int) -> None:
        self.remaining = passes

    def __call__(self, module, args, output):
        self.remaining -= 1
        if self.remaining == 0:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["ar", "sd", "pld"])
def test_ctrl_c_keeps_the_text_so_far(method):
    target = tiny_model(seed=0)
    pipe = tiny_pipeline(target, target)
    full = pipe.generate("w1 w2 w3", method=method, max_new_tokens=20, gamma=2)
    handle = target.register_forward_hook(InterruptAfter(passes=5))
    try:
        with pytest.raises(GenerationInterrupted) as interrupted:
            pipe.generate("w1 w2 w3", method=method, max_new_tokens=20, gamma=2)
    finally:
        handle.remove()
    partial = interrupted.value.result
    assert isinstance(interrupted.value, KeyboardInterrupt)  # still stops a program that does not catch it
    assert partial.stats.finish_reason == "interrupted"
    assert 0 < len(partial.token_ids) < len(full.token_ids)
    assert partial.token_ids == full.token_ids[: len(partial.token_ids)]
    assert partial.text == pipe.tokenizer.decode(partial.token_ids, skip_special_tokens=True)
