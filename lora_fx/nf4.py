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
    if nf4_tensor.NF4_OPS_TABLE.get(torch.ops.aten.clone.default) is not _exact_clone:
        nf4_tensor.implements([torch.ops.aten.clone.default])(_exact_clone)
    return nf4_tensor


def _exact_clone(func, args, kwargs):
    """clone (so copy.deepcopy and state_dict copies) of an NF4 tensor: its codes and scales copied as they are.
    torchao 0.18's own clone dequantizes and quantizes again with its default block sizes, which changes the
    weight (the double-quantized scales are recomputed) and fails for any other block size; registered in torchao's
    NF4 op table when lora_fx first loads torchao."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, apply_to_inner_tensors, \
        construct_nf4_args

    weight = args[0]
    copies = apply_to_inner_tensors(weight, func, args[1:], kwargs or {})
    extra = {"scaler_mean": weight.scaler_mean.clone(), "nf4": weight.nf4.clone()}  # not among torchao's inner names
    return NF4Tensor(*construct_nf4_args(weight, {**copies, **extra}))


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


# The NF4 matmul is one opaque op for torch.compile: inside it the weight is dequantized (one fused kernel on a GPU)
# and multiplied; its backward op dequantizes again. Written as plain ops instead, the compiler fuses the
# dequantization into the graph and its partitioner may keep each dense weight for the backward pass instead of
# recomputing it (measured: 45 GB for an 8B model where the codes take 5), which undoes the point of NF4.
_DENSE_ON_GPU = None


def _dense_fn(device: torch.device):
    """_dense, compiled once into one kernel on a GPU (the eager ops read and write each weight several times)."""
    global _DENSE_ON_GPU
    if device.type != "cuda":
        return _dense
    if _DENSE_ON_GPU is None:
        _DENSE_ON_GPU = torch.compile(_dense, dynamic=False)
    return _DENSE_ON_GPU


# rows, cols: the weight's stored shape; transposed: it is stored (in, out) (GPT-2's Conv1D, x @ W), else (out, in)
@torch.library.custom_op("lora_fx::nf4_linear", mutates_args=())
def _nf4_linear(x: torch.Tensor, codes: torch.Tensor, scalers: torch.Tensor, factors: torch.Tensor,
                mean: torch.Tensor, codebook: torch.Tensor, block: int, scaler_block: int, rows: int, cols: int,
                transposed: bool) -> torch.Tensor:
    w = _dense_fn(x.device)(codes, scalers, factors, mean, codebook, block, scaler_block, (rows, cols)).to(x.dtype)
    return x @ w if transposed else torch.nn.functional.linear(x, w)


@_nf4_linear.register_fake
def _(x, codes, scalers, factors, mean, codebook, block, scaler_block, rows, cols, transposed):
    return x.new_empty(*x.shape[:-1], cols if transposed else rows)


@torch.library.custom_op("lora_fx::nf4_linear_input_grad", mutates_args=())
def _nf4_input_grad(grad: torch.Tensor, codes: torch.Tensor, scalers: torch.Tensor, factors: torch.Tensor,
                    mean: torch.Tensor, codebook: torch.Tensor, block: int, scaler_block: int, rows: int, cols: int,
                    transposed: bool) -> torch.Tensor:
    w = _dense_fn(grad.device)(codes, scalers, factors, mean, codebook, block, scaler_block, (rows, cols))
    return torch.nn.functional.linear(grad, w.to(grad.dtype)) if transposed else grad @ w.to(grad.dtype)


@_nf4_input_grad.register_fake
def _(grad, codes, scalers, factors, mean, codebook, block, scaler_block, rows, cols, transposed):
    return grad.new_empty(*grad.shape[:-1], rows if transposed else cols)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:6])  # the codes and scales only, never a dense weight
    ctx.sizes = inputs[6:]


def _backward(ctx, grad):
    return (_nf4_input_grad(grad, *ctx.saved_tensors, *ctx.sizes),) + (None,) * 10


_nf4_linear.register_autograd(_backward, setup_context=_setup)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, transposed: bool = False) -> torch.Tensor:
    """x·dequant(W)ᵀ + b for an NF4 weight W stored (out, in); x·dequant(W) + b with transposed=True, for one
    stored (in, out). Frozen: the gradient flows to x only."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    codes, scalers, factors, mean, codebook, block, scaler_block, shape = _parts(weight)
    out = _nf4_linear(x.to(dtype), codes, scalers, factors, mean, codebook, block, scaler_block, *shape, transposed)
    return out + bias.to(out.dtype) if bias is not None else out


def nbytes(weight: torch.Tensor) -> int:
    """Bytes the NF4 form holds (codes, quantized absmaxes, their factors)."""
    return sum(t.numel() * t.element_size() for t in (weight.quantized_data, weight.quantized_scalers,
                                                        weight.quantization_factor, weight.scaler_mean))

