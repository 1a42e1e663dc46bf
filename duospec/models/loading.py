"""Which backend runs a model, and loading it: the one place that knows both backends exist.

A model source is an embedded model name, a `.gguf` file, a transformers directory or a hub id. The
transformers backend takes all of them (embedded models are converted once; a GGUF file is
de-quantised on load); the llama.cpp backend takes embedded names and GGUF files, read as they are.

`--backend auto` picks llama.cpp for a CPU run when llama-cpp-python is installed and the model
exists as GGUF (embedded or a .gguf path), and transformers otherwise (GPUs; checkpoints). The rule
comes from measurements on this project's CPU machines (see the README's benchmark): llama.cpp
runs the same GGUF 2-3x faster per token there, and every method gains from it.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from duospec.config import DuospecError
from duospec.models.base import Model, usable_cores
from duospec.models.llamacpp import LlamaCppSettings, llama_cpp_available

BACKENDS = ("auto", "transformers", "llama.cpp")


@dataclass(frozen=True)
class LoadOptions:
    """How to load one model: the resolved backend and its hardware settings."""

    backend: str  # "transformers" or "llama.cpp" (resolved, never "auto")
    device: torch.device
    dtype: torch.dtype  # transformers weights and activations; llama.cpp keeps the GGUF's own types
    threads: int | None = None  # None: every core this process may use
    quantization: str = "none"  # "int8": transformers draft weights stored as int8 (CPUs)
    llama: LlamaCppSettings = field(default_factory=LlamaCppSettings)
    attn_implementation: str = "sdpa"
    offload: bool = False  # transformers on CUDA: decoder layers in pinned CPU memory, streamed per pass (models/offload.py)
    deterministic: bool = False  # transformers: every logit row bit-identical to a one-token decode (models/deterministic.py)


@dataclass
class LoadedModel:
    model: Model
    tokenizer: object  # a transformers tokenizer (both backends: same ids for the same text)
    eos_ids: frozenset[int]
    # What a measured cost of this model depends on (backend, file identity, threads, versions).
    cost_identity: list[str] = field(default_factory=list)


def is_gguf_path(source: str) -> bool:
    return source.lower().endswith(".gguf") and Path(source).expanduser().is_file()


def has_gguf(source: str) -> bool:
    """Whether llama.cpp can run this source as it is (an embedded model or a .gguf file)."""
    from duospec.models.registry import EMBEDDED_MODELS

    return source in EMBEDDED_MODELS or is_gguf_path(source)


def resolve_backend(choice: str, source: str, device: torch.device, deterministic: bool = False) -> str:
    """The backend that will run `source`: the user's choice checked, or the `auto` rule above.

    deterministic (the target under --deterministic): only transformers can keep it, so `auto` picks it
    and an explicit llama.cpp is refused with the reason."""
    if choice not in BACKENDS:
        raise DuospecError(f"unknown backend {choice!r}; choose one of: {', '.join(BACKENDS)}")
    if deterministic and choice == "llama.cpp":
        raise DuospecError(
            "--deterministic needs the transformers backend: llama.cpp computes a multi-token pass with other kernels than a "
            "one-token pass (quantised activations, batched matmuls), and duospec cannot change that from outside. "
            "Use --backend transformers (or auto) with --deterministic, or drop --deterministic"
        )
    if choice == "auto":
        if deterministic:
            return "transformers"
        if device.type == "cpu" and has_gguf(source) and llama_cpp_available():
            return "llama.cpp"
        return "transformers"
    if choice == "llama.cpp":
        from duospec.models.llamacpp import import_llama_cpp

        import_llama_cpp()  # a clear error when it is missing
        if device.type != "cpu":
            raise DuospecError(f"duospec runs llama.cpp on the CPU only; use --backend transformers for device {device}")
        if not has_gguf(source):
            raise DuospecError(
                f"the llama.cpp backend needs a GGUF model; {source!r} is neither an embedded model nor a .gguf file. "
                "Convert it with llama.cpp's convert_hf_to_gguf.py, or use --backend transformers"
            )
    return choice


def check_source_exists(source: str) -> None:
    """A source written as a file path (a .gguf name, or one starting with /, ./, ../ or ~) must exist:
    say "no such file" instead of letting it pass for a hub id ("org/name") that fails to download."""
    from duospec.models.registry import EMBEDDED_MODELS

    if source in EMBEDDED_MODELS:
        return
    looks_like_a_path = source.lower().endswith(".gguf") or source.startswith(("/", "./", "../", "~"))
    if looks_like_a_path and not Path(source).expanduser().exists():
        raise DuospecError(f"no such file or directory: {source}; pass an existing .gguf file or checkpoint directory, an embedded model name or a hub id")


def load_model(source: str, options: LoadOptions, *, name: str | None = None, progress: bool = True) -> LoadedModel:
    """Load `source` on `options.backend` with its tokenizer and stop tokens."""
    check_source_exists(source)
    if options.offload:
        check_offload(options)
    if options.backend == "llama.cpp":
        return _load_llamacpp(source, options, name=name, progress=progress)
    return _load_transformers(source, options, name=name, progress=progress)


def _load_llamacpp(source: str, options: LoadOptions, *, name: str | None, progress: bool) -> LoadedModel:
    import llama_cpp

    from duospec.models.llamacpp import LlamaCppModel, end_of_generation_ids
    from duospec.models.registry import EMBEDDED_MODELS, ensure_gguf, gguf_dir, gguf_tokenizer

    spec = EMBEDDED_MODELS.get(source)
    if spec is not None:
        path = ensure_gguf(spec, progress=progress)
        tokenizer = gguf_tokenizer(path, cache=gguf_dir(spec) / "tokenizer")
        identity = spec.sha256
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DuospecError(f"no GGUF file at {path}")
        from duospec.models.llamacpp import check_gguf_file

        check_gguf_file(path)
        tokenizer = gguf_tokenizer(path)
        stat = path.stat()
        identity = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    settings = options.llama if options.threads is None else replace(options.llama, threads=options.threads)
    model = LlamaCppModel(path, settings, name=name or source)
    eos = set(end_of_generation_ids(model))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    cost_identity = [
        "llama.cpp",
        identity,
        f"threads={model.threads}",
        f"repack={settings.repack}",
        f"llama_cpp={llama_cpp.__version__}",
        platform.processor() or platform.machine(),
    ]
    return LoadedModel(model, tokenizer, frozenset(eos), cost_identity)


def _load_transformers(source: str, options: LoadOptions, *, name: str | None, progress: bool) -> LoadedModel:
    from duospec.models.hf import load_hf
    from duospec.models.int8 import quantize_linear_layers_int8
    from duospec.models.registry import resolve_checkpoint

    if options.threads is not None:
        torch.set_num_threads(options.threads)
    gguf_file = None
    checkpoint = source
    if is_gguf_path(source):
        path = Path(source).expanduser()
        checkpoint, gguf_file = str(path.parent), path.name
    else:
        checkpoint = resolve_checkpoint(source, progress=progress)
    model, tokenizer = load_hf(
        checkpoint,
        device=torch.device("cpu") if options.offload else options.device,  # offloading starts from the CPU
        dtype=options.dtype,
        attn_implementation=options.attn_implementation,
        name=name or source,
        gguf_file=gguf_file,
    )
    if options.quantization == "int8":
        quantize_linear_layers_int8(model.model)
    if options.offload:
        from duospec.models.hf import HFModel
        from duospec.models.offload import offload_layers

        model = HFModel(offload_layers(model.model, options.device), name=model.name)  # model.device: now the GPU
    if options.deterministic:
        model.set_deterministic(True)  # checks this machine's kernels; raises DuospecError where it cannot be kept
    identity = [
        "transformers",
        source,
        str(options.dtype),
        str(options.device),
        f"threads={torch.get_num_threads()}",
        f"quant={options.quantization}",
        torch.__version__,
        platform.processor() or platform.machine(),
    ] + (["offload"] if options.offload else []) + (["deterministic"] if options.deterministic else [])  # both change a pass's cost
    return LoadedModel(model, tokenizer, hf_eos_ids(model, tokenizer), identity)


def check_offload(options: LoadOptions) -> None:
    """Refuse --offload where it cannot run, before anything is loaded."""
    if options.device.type != "cuda" or not torch.cuda.is_available():
        found = f"this run's device is {options.device} (pass --device cuda)" if torch.cuda.is_available() else "this machine has none"
        raise DuospecError(
            "--offload needs a CUDA GPU: it keeps the target's layers in pinned CPU memory and streams them to the GPU, "
            f"but {found}; on a CPU-only machine drop --offload"
        )
    if options.backend != "transformers":
        raise DuospecError("--offload streams transformers weights to the GPU; use --backend transformers (llama.cpp runs on the CPU here)")


def hf_eos_ids(model, tokenizer) -> frozenset[int]:
    """Every id that ends generation: the generation config's EOS ids and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(getattr(getattr(model, "model", None), "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def default_threads() -> int:
    """Threads a model computes with unless told otherwise: every core this process may use."""
    return usable_cores()


def transformers_module(model: Model) -> torch.nn.Module | None:
    """The transformers module a duospec model runs, or None where it runs on another backend
    (the library baselines hand it to transformers' own `generate`)."""
    from duospec.models.hf import HFModel

    return model.model if isinstance(model, HFModel) else None


def gguf_file(model: Model) -> Path | None:
    """The GGUF file a llama.cpp model was loaded from, or None for a model on another backend."""
    from duospec.models.llamacpp import LlamaCppModel

    return Path(model.path) if isinstance(model, LlamaCppModel) else None
