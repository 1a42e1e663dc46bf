"""Weight-only int8 linear layers, for draft models on CPUs.

A CPU decode step is bound by reading weights from memory, and a draft step reads every weight of the
draft. Storing them as int8 with one scale per output row halves those bytes; torch's fused kernel
(`aten._weight_int8pack_mm`, the one gpt-fast's int8 mode uses) de-quantises on the fly. Measured on
the 2-core CPU: the 0.5B draft's MLP projection 0.198 -> 0.123 ms, its 151936 x 896 output head 15.0
-> 8.9 ms per token. torchao's int8 weight-only tensor subclass was 3x slower than bf16 here, so we
keep this small layer instead.

The fused kernel is a matrix-vector kernel: its time grows linearly with the rows of x, so past about
16 rows (a prompt's prefill) a dense bf16 matmul over freshly de-quantised weights is faster (765
rows: 44 ms fused vs 19 ms de-quantised vs 17 ms for bf16 weights), and the layer switches to it.

Only ever applied to a draft: the target's weights define the answer; a draft's only change how many
of its guesses are accepted, never what is emitted.
"""

from __future__ import annotations

import torch
from torch import nn


FUSED_KERNEL_MAX_ROWS = 16  # measured crossover on the 2-core CPU (see the module docstring)


class Int8WeightLinear(nn.Module):
    """y = x W^T + b with W stored as int8 rows times a per-row scale. x: [..., in] -> [..., out]."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # [out, in]
        scales = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # [out]
        self.register_buffer("weight_int8", torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= FUSED_KERNEL_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        else:
            out = torch.nn.functional.linear(flat, self.weight_int8.to(flat.dtype) * self.scales[:, None])
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_linear_layers_int8(model: nn.Module) -> int:
    """Replace every nn.Linear inside `model` (output head included) in place; returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8WeightLinear(child))
                replaced += 1
    return replaced


def int8_kernel_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's fused int8 weight-only kernel runs here (it is a CPU kernel)."""
    if device.type != "cpu":
        return False
    try:
        x = torch.zeros(1, 8, dtype=dtype)
        torch.ops.aten._weight_int8pack_mm(x, torch.zeros(8, 8, dtype=torch.int8), torch.ones(8, dtype=dtype))
    except (RuntimeError, NotImplementedError):  # no such kernel for this dtype/CPU: int8 drafts are not offered
        return False
    return True
