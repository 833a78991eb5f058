"""QuantLinear: a linear layer that holds its weight packed in the gptq layout.

On CUDA the forward runs the Triton dequant-matmul kernels; elsewhere it dequantizes with torch on
every call and multiplies (exact grid weights, no float copy kept: what quality measurements use).
Both give the same result up to floating-point summation order. LLMQUANT_KERNEL=torch or =triton
forces one path (for debugging; triton on the CPU needs TRITON_INTERPRET=1). Fast CPU inference
converts these layers to PyTorch's weight-only kernels instead (cpu.py).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics.pack import pack_gptq, unpack_gptq
from ..numerics.grid import QuantizedWeight


@functools.cache
def _load_kernels():
    """The Triton kernels module (llmquant.kernels.gptq) if it can run here: triton imports, and there is a
    CUDA GPU or TRITON_INTERPRET=1 was set before the first import. Once per process: forward runs for
    every linear of every token, and the answer cannot change."""
    try:
        from ..kernels import gptq
    except ImportError:
        return None
    return gptq if gptq.INTERPRETED or torch.cuda.is_available() else None


def kernels_for(x: torch.Tensor):
    """The Triton kernels module if this input should use them, else None (the torch path)."""
    mode = os.environ.get("LLMQUANT_KERNEL", "auto")
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"LLMQUANT_KERNEL must be auto, torch or triton, not {mode!r}")
    if mode == "torch" or (mode == "auto" and not x.is_cuda):
        return None
    kernels = _load_kernels()
    if kernels is None and mode == "triton":
        raise RuntimeError("LLMQUANT_KERNEL=triton, but the Triton kernels cannot run here "
                           "(no triton, or no CUDA GPU and TRITON_INTERPRET unset)")
    return kernels


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool,
                 bias: bool, dtype: torch.dtype = torch.float16, zero_offset: int = 1):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.zero_offset = zero_offset  # qzeros hold zero - zero_offset: 1 in gptq (v1) checkpoints, 0 in gptq_v2
        groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       zero_offset: int = 1) -> "QuantLinear":
        layer = cls(qw.in_features, qw.out_features, qw.bits, qw.group_size, qw.sym, bias is not None,
                    bias.dtype if bias is not None else torch.float16, zero_offset)
        for name, tensor in pack_gptq(qw, zero_offset).items():
            getattr(layer, name).copy_(tensor)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def unpack(self) -> QuantizedWeight:
        tensors = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}
        return unpack_gptq(tensors, self.bits, self.group_size, self.sym, self.zero_offset)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] this layer computes with."""
        return self.unpack().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = kernels_for(x)
        if kernels is not None:
            y = kernels.gptq_matmul(x.reshape(-1, self.in_features), self.qweight, self.qzeros, self.scales,
                                    self.g_idx, self.bits, self.group_size,
                                    zero_offset=self.zero_offset).reshape(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, zero_offset={self.zero_offset}")
