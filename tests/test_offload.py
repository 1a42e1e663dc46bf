"""--offload: decoder layers in pinned CPU memory, streamed to the GPU every pass (duospec/models/offload.py).

On a CPU-only machine every way in (LoadOptions, duospec.load, the CLI, offload_layers itself) must
refuse with the DuospecError that says to drop --offload, never a torch traceback or a silent CPU run.
The GPU tests check that an offloaded model computes what the same weights compute resident on the
GPU, pass after pass (the prefetch of the next pass's first layer included), for chains and trees.
Tiny float32 models with 3 decoder layers: an odd count, so the last layer and the next pass's first
share a staging buffer, the ordering case that an off-by-one in the events would break.
"""

from __future__ import annotations

import copy

import pytest
import torch

import duospec
from duospec.api import Pipeline
from duospec.cli import EXIT_USAGE, main
from duospec.config import DuospecError
from duospec.models.hf import HFModel
from duospec.models.loading import LoadOptions, load_model
from duospec.models.offload import _ALIGN, _PackedLayer, decoder_layers, offload_layers, offload_memory
from duospec.tree import TokenTree
from tiny_models import perturbed, tiny_config, tiny_tokenizer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
REFUSAL = "--offload needs a CUDA GPU"

PROMPT = torch.tensor([5, 9, 11, 3, 7, 20, 21])
#   0 -> 1 -> 3 -> 6
#     -> 2 -> 4
#          -> 5
TREE = TokenTree(torch.tensor([4, 8, 9, 30, 31, 32, 40]), (-1, 0, 0, 1, 2, 2, 3))


def three_layer_model(seed: int = 0):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(layers=3)).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharper logits, as tiny_models.tiny_model does
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("offload") / "target"
    three_layer_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


# -- refusals (any machine) ---------------------------------------------------------------------------
def test_load_options_with_offload_on_the_cpu_is_refused(checkpoint):
    options = LoadOptions(backend="transformers", device=torch.device("cpu"), dtype=torch.float32, offload=True)
    with pytest.raises(DuospecError, match=REFUSAL) as error:
        load_model(str(checkpoint), options)
    assert "drop --offload" in str(error.value)


@pytest.mark.parametrize("backend", ["transformers", "auto"])
def test_duospec_load_with_offload_on_the_cpu_is_refused(checkpoint, backend):
    with pytest.raises(DuospecError, match=REFUSAL):
        duospec.load(str(checkpoint), device="cpu", dtype="float32", backend=backend, offload=True, progress=False)


def test_cli_offload_on_the_cpu_exits_with_the_message_not_a_traceback(checkpoint, capsys):
    code = main(["generate", "ab", "--target", str(checkpoint), "--device", "cpu", "--dtype", "float32", "--method", "ar", "--offload"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert REFUSAL in err and "drop --offload" in err
    assert "Traceback" not in err


def test_offload_layers_refuses_a_cpu_device():
    with pytest.raises(DuospecError, match=REFUSAL):
        offload_layers(three_layer_model(), torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_offload_layers_refuses_cuda_on_a_machine_without_one():
    with pytest.raises(DuospecError, match="this machine has none"):
        offload_layers(three_layer_model(), "cuda")


def test_models_without_decoder_layers_are_refused():
    with pytest.raises(DuospecError, match="model.model.layers"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_the_draft_is_never_offloaded(checkpoint, monkeypatch):
    """duospec.load passes offload to the target's LoadOptions only."""
    seen = []

    def fake_load_model(source, options, *, name=None, progress=True):
        from duospec.models.loading import LoadedModel

        seen.append(options)
        return LoadedModel(HFModel(three_layer_model()), tiny_tokenizer(), frozenset({1}))

    monkeypatch.setattr(duospec.api, "load_model", fake_load_model)
    pipe = duospec.load(str(checkpoint), str(checkpoint), device="cpu", dtype="float32", backend="transformers", offload=True, progress=False)
    assert [options.offload for options in seen] == [True]  # the target's
    assert pipe.draft_options.offload is False  # not inherited from the target's options


def test_packing_puts_every_parameter_at_an_aligned_offset_with_its_values():
    """The index arithmetic of the flat per-layer buffer, on the CPU (no pinning, no streams)."""
    layer = three_layer_model().model.layers[1]
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    packed = _PackedLayer(layer, pin=False)
    assert all(offset % _ALIGN == 0 for offset in packed.offsets)
    assert packed.nbytes == sum(-(-p.numel() * p.element_size() // _ALIGN) * _ALIGN for p in packed.params)
    for name, param in layer.named_parameters():
        assert param.untyped_storage().data_ptr() == packed.buffer.untyped_storage().data_ptr(), name
        assert torch.equal(param, before[name]), name
    # A copy of the buffer (what the GPU staging buffer receives) shows the same weights through its views.
    staged = packed.views_into(packed.buffer.clone())
    for (name, _), view in zip(layer.named_parameters(), staged):
        assert torch.equal(view, before[name]), name  # not a neighbour's bytes


# -- on a GPU ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resident_and_offloaded():
    cpu_model = three_layer_model()
    resident = copy.deepcopy(cpu_model).to("cuda")
    offloaded = offload_layers(cpu_model, torch.device("cuda"))
    return resident, offloaded


@needs_cuda
def test_offloaded_layers_live_in_pinned_memory_and_the_rest_on_the_gpu(resident_and_offloaded):
    _, offloaded = resident_and_offloaded
    assert offloaded.device.type == "cuda"  # HFModel takes its device from here
    for layer in offloaded.model.layers:
        assert all(p.device.type == "cpu" and p.is_pinned() for p in layer.parameters())
    assert offloaded.lm_head.weight.is_cuda and offloaded.model.embed_tokens.weight.is_cuda and offloaded.model.norm.weight.is_cuda
    memory = offload_memory(offloaded)
    layer_bytes = [sum(-(-p.numel() * p.element_size() // _ALIGN) * _ALIGN for p in layer.parameters()) for layer in offloaded.model.layers]
    assert memory.layers == 3 and memory.pinned_bytes == sum(layer_bytes)
    assert memory.gpu_staging_bytes == 2 * max(layer_bytes)
    head_bytes = sum(p.numel() * 4 for p in (offloaded.lm_head.weight, offloaded.model.embed_tokens.weight, offloaded.model.norm.weight))
    assert head_bytes <= memory.gpu_resident_bytes < head_bytes + 4096  # + the rotary buffer
    assert offload_memory(resident_and_offloaded[0]) is None


@needs_cuda
def test_offloaded_logits_equal_resident_logits_prompt_chain_and_tree(resident_and_offloaded):
    resident, offloaded = (HFModel(model) for model in resident_and_offloaded)
    for _ in range(2):  # the second round starts from the prefetched first layer
        for model in (resident, offloaded):
            model.reset()
        steps = [
            lambda m: m.forward(PROMPT),
            lambda m: m.forward(torch.tensor([13])),
            lambda m: m.forward(torch.tensor([40, 41, 42, 43, 44])),
            lambda m: m.forward(TREE.tokens, m.cache_len + TREE.depth_tensor(), TREE.ancestor_mask()),
        ]
        for step in steps:
            expected, got = step(resident), step(offloaded)
            assert got.device.type == "cuda"
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        for model in (resident, offloaded):
            model.keep([0, 2, 5])
        torch.testing.assert_close(offloaded.forward(torch.tensor([7])), resident.forward(torch.tensor([7])), atol=1e-5, rtol=1e-5)
    for layer in resident_and_offloaded[1].model.layers:  # between passes the parameters show the pinned copy again
        assert all(p.device.type == "cpu" for p in layer.parameters())


@needs_cuda
@pytest.mark.parametrize("method", ["ar", "sd"])
def test_greedy_generation_is_identical_token_for_token(resident_and_offloaded, method):
    resident, offloaded = resident_and_offloaded
    draft = HFModel(perturbed(three_layer_model().float(), noise=0.2, seed=7).to("cuda"))
    answers = []
    for target in (resident, offloaded):
        pipe = Pipeline(HFModel(target), tiny_tokenizer(), device=torch.device("cuda"), dtype=torch.float32, threads=torch.get_num_threads(), progress=False)
        pipe.attach_draft(draft)
        options = {"gamma": 3} if method == "sd" else {}
        answers.append(pipe.generate("ab cd", method=method, max_new_tokens=40, **options).token_ids)
    assert len(answers[0]) > 10
    assert answers[1] == answers[0]


@needs_cuda
def test_duospec_load_with_offload_on_a_gpu(checkpoint):
    offloaded = duospec.load(str(checkpoint), device="cuda", dtype="float32", backend="transformers", offload=True, progress=False)
    resident = duospec.load(str(checkpoint), device="cuda", dtype="float32", backend="transformers", progress=False)
    assert offload_memory(offloaded.target.model) is not None and offloaded.target.device.type == "cuda"
    assert offload_memory(resident.target.model) is None
    assert offloaded.generate("ab", method="ar", max_new_tokens=30).token_ids == resident.generate("ab", method="ar", max_new_tokens=30).token_ids
