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


def dequantize(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight an NF4 weight computes with (in its own dtype, or `dtype`)."""
    dense = weight.get_original_weight()
    return dense.to(dtype) if dtype is not None else dense


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x·dequant(W)ᵀ + b; the backward pass dequantizes again rather than keep the dense weight."""
    out = _torchao().linear_nf4(x, weight)
    return out + bias.to(out.dtype) if bias is not None else out


def nbytes(weight: torch.Tensor) -> int:
    """Bytes the NF4 form holds (codes, quantized absmaxes, their factors)."""
    return sum(t.numel() * t.element_size() for t in (weight.quantized_data, weight.quantized_scalers,
                                                        weight.quantization_factor, weight.scaler_mean))

