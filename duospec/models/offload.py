"""Weight offloading for targets larger than the GPU (SpecExec's setting, DESIGN.md section 1.2).

Each decoder layer's weights live in one flat buffer of pinned CPU memory; everything else
(embeddings, final norm, lm_head, the rotary embedding's buffers) stays on the GPU. Two GPU staging
buffers, each the size of the largest layer, take turns: while layer i computes from one, layer i+1
is copied into the other on a second CUDA stream. A pass then costs about one read of the weights
over PCIe, whatever the number of tokens in it, which is what makes verifying very large trees pay.

Ordering, with one event per buffer on each side (a copy stream and the caller's compute stream):
    copy j into buffer b   waits for  `free[b]`  (the compute that last read b, layer j-2, is done)
    compute layer j        waits for  `ready[b]` (the copy of layer j into b is done)
Layer j always uses buffer j % 2, so consecutive layers never share one.

Pinned memory is what makes the copies asynchronous and fast: a copy from pageable memory is staged
through a bounce buffer by the driver and blocks the host. One flat buffer per layer makes one large
copy (near peak bandwidth) instead of a dozen small ones.

The pinned buffers are ordinary allocations registered with CUDA (`cudaHostRegister`, as
torch.distributed's checkpoint stager does), not `torch.empty(pin_memory=True)`: torch's pinned
allocator rounds every block up to a power of two, so a 466 MB layer of a 7B model would take 512 MB
and a 94 MB layer of a 1.5B model 128 MB, up to twice the RAM that offloading exists to save.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass

import torch

from duospec.config import DuospecError

_ALIGN = 256  # bytes; every parameter starts on this boundary (what cuBLAS and vector loads like best)


@dataclass(frozen=True)
class OffloadMemory:
    """Where an offloaded model's bytes are: the README's and the stats' figures."""

    layers: int
    pinned_bytes: int  # every decoder layer's weights, in pinned CPU memory
    gpu_resident_bytes: int  # embeddings, final norm, lm_head, layers' buffers: always on the GPU
    gpu_staging_bytes: int  # the two staging buffers (2 x the largest layer)

    @property
    def gpu_bytes(self) -> int:
        return self.gpu_resident_bytes + self.gpu_staging_bytes

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "pinned_bytes": self.pinned_bytes,
            "gpu_resident_bytes": self.gpu_resident_bytes,
            "gpu_staging_bytes": self.gpu_staging_bytes,
            "gpu_bytes": self.gpu_bytes,
        }


class _PackedLayer:
    """One layer's parameters packed into a flat byte buffer, each parameter a view at its offset."""

    def __init__(self, layer: torch.nn.Module, pin: bool) -> None:
        self.params = list(layer.parameters())  # unique parameters, in registration order
        self.offsets: list[int] = []
        size = 0
        for param in self.params:
            self.offsets.append(size)
            size += _aligned(param.numel() * param.element_size())
        self.nbytes = size
        self.buffer = pinned_empty(size) if pin else torch.empty(size, dtype=torch.uint8)
        self.cpu_views = self.views_into(self.buffer)
        for param, view in zip(self.params, self.cpu_views):
            view.copy_(param.data)
            param.data = view  # the original (pageable) storage is freed once nothing else holds it

    def views_into(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's tensor inside `buffer` (a uint8 buffer of at least `nbytes`)."""
        views = []
        for param, offset in zip(self.params, self.offsets):
            nbytes = param.numel() * param.element_size()
            views.append(buffer[offset : offset + nbytes].view(param.dtype).view(param.shape))
        return views


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def pinned_empty(nbytes: int) -> torch.Tensor:
    """`nbytes` of page-locked CPU memory (uint8), exactly that many (see the module docstring).

    Registered memory is unregistered when the tensor is collected. Where registering fails, torch's
    own pinned allocator (rounded up) is used instead.
    """
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes == 0:
        return buffer
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(buffer.data_ptr(), nbytes, 1)) == 0:  # 1: cudaHostRegisterPortable
        weakref.finalize(buffer, cudart.cudaHostUnregister, buffer.data_ptr())
        return buffer
    _clear_cuda_error()
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _clear_cuda_error() -> None:
    """Read off the error a failed runtime call left behind; torch's next kernel-launch check would raise it."""
    try:
        ctypes.CDLL(f"libcudart.so.{torch.version.cuda.split('.')[0]}").cudaGetLastError()
    except (OSError, AttributeError):  # no such library by that name: nothing more to do
        pass


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Llama/Qwen2-style causal LM (`model.model.layers`); refuses other layouts."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise DuospecError(
            f"--offload streams decoder layers found at `model.model.layers` (Llama, Qwen2, Mistral and similar "
            f"models); {type(model).__name__} has none there. Run this model without --offload"
        )
    return layers


class LayerStreamer:
    """Streams decoder layers' weights from pinned CPU memory to two GPU staging buffers.

    Installed by `offload_layers` as forward pre-/post-hooks on every decoder layer; kept alive on the
    model (`model._duospec_offload`). Outside a layer's forward its parameters point at their pinned
    CPU copy, so the model's parameters always show the real weights.
    """

    def __init__(self, model: torch.nn.Module, layers: torch.nn.ModuleList, device: torch.device) -> None:
        self.device = device
        self.packed = [_PackedLayer(layer, pin=True) for layer in layers]
        largest = max(packed.nbytes for packed in self.packed)
        self.slots = [torch.empty(largest, dtype=torch.uint8, device=device) for _ in range(2)]
        self.gpu_views = [packed.views_into(self.slots[index % 2]) for index, packed in enumerate(self.packed)]
        self.copy_stream = torch.cuda.Stream(device)
        self.ready = [torch.cuda.Event() for _ in range(2)]  # copy into slot b done
        self.free = [torch.cuda.Event() for _ in range(2)]  # last compute reading slot b done
        self.pending: list[int | None] = [None, None]  # the layer whose copy into slot b is queued, unused yet
        self.handles = []
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._before(index)))
            self.handles.append(layer.register_forward_hook(self._after(index)))
        self.memory = OffloadMemory(
            layers=len(layers),
            pinned_bytes=sum(packed.nbytes for packed in self.packed),
            gpu_resident_bytes=_gpu_bytes(model, device),
            gpu_staging_bytes=2 * largest,
        )

    def _copy(self, index: int) -> None:
        """Queue layer `index`'s weights into its slot on the copy stream, after the slot's last use."""
        slot = index % 2
        packed = self.packed[index]
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.free[slot])  # a never-recorded event waits for nothing
            self.slots[slot][: packed.nbytes].copy_(packed.buffer, non_blocking=True)
            self.ready[slot].record(self.copy_stream)
        self.pending[slot] = index

    def _before(self, index: int):
        def hook(module, args):
            slot = index % 2
            compute = torch.cuda.current_stream(self.device)
            if self.pending[slot] != index:
                # Not prefetched: the very first pass, or one after a pass that broke off. Wait for all
                # compute queued so far, so the copy cannot overwrite a slot a queued kernel still reads.
                self.copy_stream.wait_stream(compute)
                self._copy(index)
            self.pending[slot] = None
            compute.wait_event(self.ready[slot])
            for param, view in zip(self.packed[index].params, self.gpu_views[index]):
                param.data = view
            if index + 1 < len(self.packed):
                self._copy(index + 1)  # overlaps this layer's compute

        return hook

    def _after(self, index: int):
        def hook(module, args, output):
            slot = index % 2
            self.free[slot].record(torch.cuda.current_stream(self.device))
            for param, view in zip(self.packed[index].params, self.packed[index].cpu_views):
                param.data = view
            if index == len(self.packed) - 1:
                # The next pass starts with layer 0: its copy overlaps the lm_head and everything the
                # caller does between passes. Queued here, after `free` of this layer's slot, because
                # with an odd number of layers layer 0 shares the last layer's slot.
                self._copy(0)

        return hook


def _gpu_bytes(model: torch.nn.Module, device: torch.device) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if t.device == device}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def offload_layers(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Keep `model`'s decoder layers in pinned CPU memory, streamed to `device` every forward pass.

    `model` is a transformers causal LM loaded on the CPU (Llama/Qwen2 layout). Everything but the
    decoder layers' parameters moves to `device` (so `model.device` is the GPU); returns the same model.
    Raises DuospecError without a CUDA GPU: offloading on a CPU would only add copies.
    """
    device = _cuda_device(device)
    if getattr(model, "_duospec_offload", None) is not None:
        raise DuospecError("this model is already offloaded")
    layers = decoder_layers(model)
    if any(p.device.type != "cpu" for layer in layers for p in layer.parameters()):
        raise DuospecError("--offload needs the model loaded on the CPU first (its decoder layers are elsewhere)")
    in_layers = {id(module) for layer in layers for module in layer.modules()}
    for module in model.modules():
        owned_by_layer = id(module) in in_layers
        for name, param in module.named_parameters(recurse=False):
            if not owned_by_layer:
                param.data = param.data.to(device)  # a tied lm_head is the same Parameter: moved once
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)  # layers' buffers too: small, used every pass
    model._duospec_offload = LayerStreamer(model, layers, device)
    return model


def _cuda_device(device: torch.device | str) -> torch.device:
    """`device` with its index, or the DuospecError that says to drop --offload."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        found = f"the device is {device} (pass a cuda device)" if torch.cuda.is_available() else "this machine has none"
        raise DuospecError(
            f"--offload needs a CUDA GPU: it keeps the target's layers in pinned CPU memory and streams them to "
            f"the GPU, but {found}; on a CPU-only machine drop --offload"
        )
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def offload_memory(model: torch.nn.Module) -> OffloadMemory | None:
    """Pinned and GPU bytes of a model offloaded by `offload_layers`; None for any other model."""
    streamer = getattr(model, "_duospec_offload", None)
    return streamer.memory if streamer is not None else None
