"""NF4 frozen weights (QLoRA, Dettmers et al., 2023) through torchao's NF4Tensor.

A weight becomes 4-bit NormalFloat codes in blocks of 64 with one absmax per block, the absmaxes themselves
quantized to int8 in blocks (double quantization): about 0.52 bytes a parameter instead of 2. The matmul
dequantizes to the activation's dtype and runs there (bf16 compute); the backward pass needs only the input
gradient, g·dequant(W), so nothing but the codes is saved for it.

Why torchao: its NF4Tensor is plain PyTorch (runs on the CPU, so CI tests the same code the GPU runs), it composes
with torch.compile (inductor fuses the dequantization into one kernel) and with FSDP2, and it carries double
quantization. bitsandbytes, which PEFT uses, is the peer in benchmarks/qlora_train.py.
"""

from __future__ import annotations

import torch

from lora_fx.errors import InputError

EXTRA = "lora-fx[quant]"  # the optional extra that brings torchao


def _torchao():
    import logging
    import warnings

    quiet = logging.getLogger("torchao")  # torchao logs a warning for each C++ kernel its build cannot load here;
    level, quiet.level = quiet.level, logging.ERROR  # NF4 is plain PyTorch and needs none of them
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except Exception as exc:  # torchao is optional
        raise InputError(f"NF4 needs torchao, which could not be imported ({type(exc).__name__}: {exc})",
                         where="quantize_base(..., 'nf4')",
                         fix=f"pip install '{EXTRA}' (or pip install torchao)") from None
    finally:
        quiet.setLevel(level)
    return nf4_tensor


def block_sizes(numel: int, block_size: int = 64) -> tuple[int, int] | None:
    """(block size, scaler block size) that tile a weight of `numel` elements, or None.

    QLoRA's 64-element blocks when they divide the weight (every transformer width does), else the largest power of
    two below it that does (a small test model); the double-quantization blocks: the largest divisor of the
    block count up to 256, since torchao needs the block count to be a multiple of it."""
    while block_size >= 8 and numel % block_size:
        block_size //= 2
    if block_size < 8:
        return None
    blocks = numel // block_size
    scaler = max(d for d in range(1, min(256, blocks) + 1) if blocks % d == 0)
    return block_size, scaler


def is_nf4(tensor: object) -> bool:
    return type(tensor).__name__ == "NF4Tensor"


def quantize(weight: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """The NF4 form of `weight` (same shape, dtype and device as the weight reports)."""
    sizes = block_sizes(weight.numel(), block_size)
    if sizes is None:
        raise InputError(f"a weight of shape {tuple(weight.shape)} cannot be split into NF4 blocks of 8 or more",
                         where="quantize_base", fix="leave this weight out of the rules or of which=")
    with torch.no_grad():
        return _torchao().to_nf4(weight.detach().contiguous(), *sizes)


def _parts(weight: torch.Tensor) -> tuple:
    """The plain tensors (and sizes) an NF4 weight is made of: its 4-bit codes two to a byte, the int8 block
    scales, their per-group factors and mean, the 16-value codebook."""
    return (weight.quantized_data, weight.quantized_scalers, weight.quantization_factor, weight.scaler_mean,
            weight.nf4, weight.block_size, weight.scaler_block_size, weight.shape)


def _dense(codes, scalers, factors, mean, codebook, block, scaler_block, shape) -> torch.Tensor:
    """torchao's NF4 dequantization (bit for bit) in plain tensor ops: torch.compile fuses it into one kernel, also
    inside an activation-checkpointed layer, where the NF4 tensor subclass itself breaks the graph."""
    scales = (scalers.view(-1, scaler_block) / factors.unsqueeze(-1)).flatten().to(codebook.dtype) + mean
    values = torch.stack([codebook[(codes >> 4).int()], codebook[(codes & 15).int()]], dim=-1)
    return (values.view(-1, block) * scales.unsqueeze(-1)).view(shape)


def dequantize(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight an NF4 weight computes with (in its own dtype, or `dtype`)."""
    dense = _dense(*_parts(weight))
    return dense.to(dtype) if dtype is not None else dense


class _Nf4Linear(torch.autograd.Function):
    """x·dequant(W)ᵀ; the backward pass dequantizes again (only the 4-bit codes are saved, never the dense W)."""

    @staticmethod
    def forward(ctx, x, codes, scalers, factors, mean, codebook, block, scaler_block, shape):
        ctx.save_for_backward(codes, scalers, factors, mean, codebook)
        ctx.sizes = (block, scaler_block, shape)
        return torch.nn.functional.linear(x, _dense(codes, scalers, factors, mean, codebook, block, scaler_block,
                                                    shape).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        w = _dense(*ctx.saved_tensors, *ctx.sizes).to(grad.dtype)
        return (grad @ w,) + (None,) * 8


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x·dequant(W)ᵀ + b for an NF4 weight W (frozen: the gradient flows to x only)."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    out = _Nf4Linear.apply(x.to(dtype), *_parts(weight))
    return out + bias.to(out.dtype) if bias is not None else out


def nbytes(weight: torch.Tensor) -> int:
    """Bytes the NF4 form holds (codes, quantized absmaxes, their factors)."""
    return sum(t.numel() * t.element_size() for t in (weight.quantized_data, weight.quantized_scalers,
                                                        weight.quantization_factor, weight.scaler_mean))

