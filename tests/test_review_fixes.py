"""Fixes found on review: the cache keyword of transformers 5.24, tiny temperatures, bool token ids,
and `HFModel.keep` refusing node lists that are not a root-first path of the last forward."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from law_checks import assert_softmax_close, law_sum_tolerance
from tiny_models import tiny_model, tiny_pipeline
from transformers import Qwen2ForCausalLM

from duospec.config import MIN_TEMPERATURE, DuospecError, SamplingConfig
from duospec.models.hf import HFModel, cache_kwarg_name
from duospec.sampling import sample, warp_probs
from duospec.tree import TokenTree

PROMPT = torch.tensor([5, 9, 11, 3, 7, 20, 21])
#   0 -> 1 -> 3 -> 6
#     -> 2 -> 4
#          -> 5
TREE = TokenTree(torch.tensor([4, 8, 9, 30, 31, 32, 40]), (-1, 0, 0, 1, 2, 2, 3))


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


# ---------------------------------------------------------------------------------------------------
# 1. The KV cache goes in under the name the model's forward declares, and no forward warns.


class OldStyleQwen2(Qwen2ForCausalLM):
    """A model whose forward still takes `past_key_values` (as in transformers 5.20-5.23) and `**kwargs`,
    where a `cache=` keyword would be swallowed silently."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        assert past_key_values is not None, "the cache did not arrive under past_key_values"
        assert "cache" not in kwargs
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=past_key_values, use_cache=use_cache, logits_to_keep=logits_to_keep)


def test_forward_emits_no_warnings(model):
    hf = HFModel(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf.forward(PROMPT)
        hf.forward(TREE.tokens, len(PROMPT) + TREE.depth_tensor(), TREE.ancestor_mask())
        hf.keep([0, 2, 5])
        hf.forward(torch.tensor([12]), last_only=True)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_the_cache_keyword_follows_the_forward_signature(model):
    renamed = Version(transformers.__version__) >= Version("5.24.0")  # the release that renamed it to `cache`
    assert cache_kwarg_name(model) == ("cache" if renamed else "past_key_values")

    class KwargsOnly(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            return None

    assert cache_kwarg_name(KwargsOnly()) == "past_key_values"


def test_the_cache_is_really_used(model):
    """Tokens reach the cache, and a step after the prompt gives the logits of the whole sequence."""
    hf = HFModel(model)
    hf.forward(PROMPT)
    assert hf.cache.get_seq_length() == len(PROMPT)
    step = hf.forward(torch.tensor([12]))
    whole = HFModel(model).forward(torch.cat([PROMPT, torch.tensor([12])]))[-1:]
    torch.testing.assert_close(step, whole, atol=1e-5, rtol=1e-5)


def test_an_old_style_forward_gets_past_key_values(model):
    old = OldStyleQwen2(model.config).float().eval()
    old.load_state_dict(model.state_dict())
    hf = HFModel(old)
    assert hf._cache_kwarg == "past_key_values"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf.forward(PROMPT)
        step = hf.forward(torch.tensor([12]))
    assert hf.cache.get_seq_length() == len(PROMPT) + 1
    expected = HFModel(model).forward(torch.cat([PROMPT, torch.tensor([12])]))[-1:]
    torch.testing.assert_close(step, expected, atol=1e-5, rtol=1e-5)
    # On transformers >= 5.24 the parent forward is called with `cache=`: still no warning.
    assert [str(w.message) for w in caught] == []


# ---------------------------------------------------------------------------------------------------
# 2. Tiny positive temperatures: the exact limit (argmax, ties split), never inf or NaN.

LOGITS = torch.tensor([[3.0, 1.0, -2.0, 3.0], [0.5, 0.1, 0.2, -1.0], [1e4, -1e4, 9999.0, 0.0]])


@pytest.mark.parametrize("temperature", [1e-5, 1e-30, 1e-37, MIN_TEMPERATURE])
def test_tiny_temperature_gives_the_argmax_law(temperature):
    probs = warp_probs(LOGITS, SamplingConfig(temperature=temperature))
    assert torch.isfinite(probs).all()
    assert probs.tolist() == [[0.5, 0.0, 0.0, 0.5], [1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    drawn = sample(probs, torch.Generator().manual_seed(0))
    assert drawn[1:].tolist() == [0, 0] and drawn[0].item() in (0, 3)


@pytest.mark.parametrize("config", [SamplingConfig(temperature=1e-30, top_k=2), SamplingConfig(temperature=1e-30, top_p=0.5)],
                         ids=repr)
def test_tiny_temperature_with_filters_stays_a_law(config):
    logits = torch.randn(16, 40, generator=torch.Generator().manual_seed(1)) * 5
    probs = warp_probs(logits, config)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(16), rtol=0, atol=law_sum_tolerance(logits.shape[-1]))
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.0, 4.0])
def test_shifting_by_the_max_keeps_the_law(temperature):
    """softmax((x - max) / T) is softmax(x / T): the shift changes nothing but rounding, and that rounding
    is closer to the exact law (float64) than dividing first: x - max is exact for nearby logits (Sterbenz),
    whereas x / T rounds large values before softmax subtracts them (at T = 0.05 here, 1e-4 relative)."""
    logits = torch.randn(32, 50, generator=torch.Generator().manual_seed(2)) * 6 + 40
    exact = torch.softmax(logits.double() / temperature, dim=-1)
    probs = warp_probs(logits, SamplingConfig(temperature=temperature))
    assert_softmax_close(probs, logits.double() / temperature)  # within float32's rounding (law_checks)
    probs = probs.double()
    divided_first = torch.softmax(logits / temperature, dim=-1).double()
    assert (probs - exact).abs().max() <= (divided_first - exact).abs().max()


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 1e-300, 5e-324])
def test_temperature_below_the_floor_is_refused(temperature):
    with pytest.raises(DuospecError, match="use 0 for greedy"):
        SamplingConfig(temperature=temperature)


def test_temperature_floor_and_zero_are_accepted():
    assert SamplingConfig(temperature=0).is_greedy
    assert not SamplingConfig(temperature=MIN_TEMPERATURE).is_greedy


# ---------------------------------------------------------------------------------------------------
# 3. Bools are not token ids (Pipeline.encode).


@pytest.mark.parametrize("prompt", [[True, 5], [5, False]])
def test_bool_token_ids_are_refused(model, prompt):
    pipe = tiny_pipeline(model)
    with pytest.raises(DuospecError, match="token-id prompt"):
        pipe.encode(prompt)


def test_int_token_ids_are_still_accepted(model):
    assert tiny_pipeline(model).encode([1, 5]) == [1, 5]


# ---------------------------------------------------------------------------------------------------
# 4. keep refuses anything but a root-first, strictly increasing path of the last forward's tokens.


def tree_forward(model) -> HFModel:
    hf = HFModel(model)
    hf.forward(PROMPT)
    hf.forward(TREE.tokens, len(PROMPT) + TREE.depth_tensor(), TREE.ancestor_mask())
    return hf


@pytest.mark.parametrize(
    "nodes, message",
    [
        ([0, 2, 1], "strictly increasing"),
        ([1, 2], "root-first"),
        ([2], "root-first"),
        ([0, 0, 1], "strictly increasing"),
        ([0, 1, 1], "strictly increasing"),
        ([0, 2, 7], "only 7 token"),
        ([0, 99], "only 7 token"),
        ([], "non-empty"),
        ([0, -1], "strictly increasing"),
        ([0, 1.0], "integer"),
        ([False, 1], "integer"),
    ],
)
def test_keep_refuses_what_is_not_a_path(model, nodes, message):
    hf = tree_forward(model)
    before = hf.cache_len
    with pytest.raises(ValueError, match=message):
        hf.keep(nodes)
    assert hf.cache_len == before  # nothing was changed
    hf.keep([0, 2, 5])  # a real path still works afterwards
    assert hf.cache_len == len(PROMPT) + 3


def test_keep_bounds_follow_the_cache(model):
    hf = tree_forward(model)
    hf.keep([0, 2, 4])
    with pytest.raises(ValueError, match="only 3 token"):
        hf.keep([0, 2, 4, 5])
    hf.reset()
    with pytest.raises(ValueError, match="nothing to index"):
        hf.keep([0])


def test_keep_accepts_real_paths(model):
    for leaf in (0, 1, 3, 4, 5, 6):
        hf = tree_forward(model)
        hf.keep(TREE.path_to(leaf))
        assert hf.cache_len == len(PROMPT) + len(TREE.path_to(leaf))
