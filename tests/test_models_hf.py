"""The transformers backend: tree passes, cache keep/crop, the growing cache layer, int8 draft layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from duospec.api import resolve_draft_quantization
from duospec.config import DuospecError
from duospec.models.hf import HFModel
from duospec.models.hf_cache import GrowingLayer, new_cache
from duospec.models.int8 import FUSED_KERNEL_MAX_ROWS, Int8WeightLinear, quantize_linear_layers_int8
from duospec.tree import TokenTree
from tiny_models import tiny_config, tiny_model

PROMPT = torch.tensor([5, 9, 11, 3, 7, 20, 21])
# A bushy tree of depth 3 (the depth that once exposed an ancestor-mask bug):
#   0 -> 1 -> 3 -> 6
#     -> 2 -> 4
#          -> 5
TREE = TokenTree(torch.tensor([4, 8, 9, 30, 31, 32, 40]), (-1, 0, 0, 1, 2, 2, 3))


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    model = tiny_model(seed=0)
    model.config._attn_implementation = request.param
    return model


def path_logits(model, nodes: list[int]) -> torch.Tensor:
    """Reference: run prompt + one root-to-node path as a plain sequence. Returns [len(path), V]."""
    reference = HFModel(model)
    reference.forward(PROMPT)
    return reference.forward(TREE.tokens[nodes])


def test_tree_pass_equals_each_path_on_its_own(model):
    hf = HFModel(model)
    hf.forward(PROMPT)
    logits = hf.forward(TREE.tokens, len(PROMPT) + TREE.depth_tensor(), TREE.ancestor_mask())
    for leaf in (4, 5, 6):
        path = TREE.path_to(leaf)
        torch.testing.assert_close(logits[path], path_logits(model, path), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", [[0, 2, 5], [0, 1, 3, 6], [0], [0, 1]])
def test_keep_gathers_the_accepted_path(model, path):
    """After keep(path) the cache holds exactly prompt + path: the next token's logits match a fresh run."""
    hf = HFModel(model)
    hf.forward(PROMPT)
    hf.forward(TREE.tokens, len(PROMPT) + TREE.depth_tensor(), TREE.ancestor_mask())
    hf.keep(path)
    assert hf.cache_len == len(PROMPT) + len(path)
    following = torch.tensor([13])
    fresh = HFModel(model)
    expected = fresh.forward(torch.cat([PROMPT, TREE.tokens[path], following]))[-1:]
    torch.testing.assert_close(hf.forward(following), expected, atol=1e-5, rtol=1e-5)


def test_crop_then_continue_equals_a_fresh_run(model):
    hf = HFModel(model)
    hf.forward(torch.arange(1, 30))
    hf.crop(12)
    continued = hf.forward(torch.tensor([40, 41]))
    fresh = HFModel(model).forward(torch.cat([torch.arange(1, 13), torch.tensor([40, 41])]))[-2:]
    torch.testing.assert_close(continued, fresh, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot crop a cache of 14 tokens to 20"):
        hf.crop(20)


def test_growing_layer_matches_dynamic_layer_past_its_capacity():
    """Appends, crops and growth past the 256-slot buffer give the same keys as transformers' own layer."""
    generator = torch.Generator().manual_seed(0)
    ours, reference = GrowingLayer(), DynamicCache(config=tiny_config()).layers[0]
    for step, (appended, removed) in enumerate([(200, 0), (40, 15), (1, 0), (90, 30), (5, 5), (300, 0)]):
        keys = torch.randn(1, 2, appended, 8, generator=generator)
        values = torch.randn(1, 2, appended, 8, generator=generator)
        got_keys, got_values = ours.update(keys, values)
        want_keys, want_values = reference.update(keys, values)
        assert torch.equal(got_keys, want_keys) and torch.equal(got_values, want_values), step
        ours.crop(-removed)
        reference.crop(-removed)
        assert ours.get_seq_length() == reference.get_seq_length()
    assert ours._key_buffer.shape[2] >= 500  # it really grew past the initial 256 slots


def test_growing_layer_keeps_views_under_batch_helpers():
    layer = GrowingLayer()
    layer.update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.keys.shape == (1, 1, 3, 4)
    layer.update(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))
    assert layer.keys.shape == (1, 1, 5, 4) and layer.keys.data_ptr() == layer._key_buffer.data_ptr()


def test_long_generation_through_cache_growth_equals_transformers():
    """A prompt + answer past 256 tokens (the first buffer growth) still equals transformers' generate."""
    model = tiny_model(seed=4, max_positions=1024)
    prompt = torch.randint(2, 64, (250,), generator=torch.Generator().manual_seed(1))
    hf = HFModel(model)
    logits = hf.forward(prompt, last_only=True)
    ours = []
    for _ in range(40):
        token = logits.argmax(-1)
        ours.append(int(token))
        logits = hf.forward(token)
    reference = model.generate(prompt[None], attention_mask=torch.ones(1, 250, dtype=torch.long), max_new_tokens=40,
                               min_new_tokens=40, do_sample=False, pad_token_id=0)[0, 250:].tolist()
    assert ours == reference


def test_sliding_window_models_are_refused_clearly():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, use_sliding_window=True, sliding_window=16, max_window_layers=0,
                         layer_types=["sliding_attention", "sliding_attention"])
    with pytest.raises(DuospecError, match="needs full attention in every layer"):
        new_cache(config, "slider")
    with pytest.raises(DuospecError, match="slider: duospec needs full attention"):
        HFModel(Qwen2ForCausalLM(config), name="slider")


@pytest.mark.parametrize("rows", [1, 3, FUSED_KERNEL_MAX_ROWS, FUSED_KERNEL_MAX_ROWS + 1, 100])
def test_int8_linear_matches_its_dequantised_weights(rows):
    """Both paths (fused kernel for few rows, dense matmul for many) compute x W_q^T + b exactly enough."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = Int8WeightLinear(linear)
    dequantised = layer.weight_int8.float() * layer.scales.float()[:, None]
    x = torch.randn(2, rows, 64)
    torch.testing.assert_close(layer(x), x @ dequantised.T + linear.bias, atol=1e-4, rtol=1e-4)
    assert (dequantised - linear.weight).abs().max() <= layer.scales.max() / 2 + 1e-6  # rounding error bound


def test_int8_draft_model_stays_a_good_draft():
    model = tiny_model(seed=0)
    quantised = tiny_model(seed=0)
    assert quantize_linear_layers_int8(quantised) == 2 * 7 + 1  # 7 projections per layer + the output head
    tokens = torch.randint(2, 64, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        agreement = (model(tokens).logits.argmax(-1) == quantised(tokens).logits.argmax(-1)).float().mean()
    assert agreement > 0.9
    assert HFModel(quantised).vocab_size == 64


def test_draft_quantization_choice():
    cpu = torch.device("cpu")
    assert resolve_draft_quantization("auto", cpu, torch.bfloat16) == "int8"
    assert resolve_draft_quantization("none", cpu, torch.bfloat16) == "none"
    with pytest.raises(DuospecError, match="unknown draft quantization 'int4'"):
        resolve_draft_quantization("int4", cpu, torch.bfloat16)
    if not torch.cuda.is_available():
        assert resolve_draft_quantization("auto", torch.device("cuda"), torch.bfloat16) == "none"
