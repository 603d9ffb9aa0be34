"""FP8 frozen matmuls: the base weight in float8 e4m3, scaled once; activations and gradients scaled per row.

A frozen weight never changes, so its FP8 forms are made once:

    forward   y  = x·Wᵀ   as  _scaled_mm(x8, W8ᵀ)    x8: rows of x scaled to e4m3's range (per step)
                                                    W8: rows of W scaled once (one scale per output feature)
    backward  gx = g·W    as  _scaled_mm(g8, Wt8ᵀ)   g8: rows of g scaled per step
                                                    Wt8: Wᵀ stored row-major, scaled per input feature, once

Both products run on Hopper's FP8 tensor cores (torch._scaled_mm with row-wise scales, bf16 out). No weight
gradient is computed (the weight is frozen); the LoRA branches stay in bf16. torchao's float8 training would
re-scale the weight every step, which a frozen weight does not need.

Without an FP8-capable GPU (the CPU, where CI runs) the same scaled codes are multiplied in fp32 by
`reference_mm`, so tests check the quantization and the graph rewrite; the GPU run checks the kernel against it.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
TILE = 16  # _scaled_mm wants both dimensions of its operands to be multiples of 16
# Hopper's fast FP8 accumulation for the input gradient too (the forward pass always uses it); off by default:
# gradients then accumulate at full precision (benchmarks/train_throughput.py measures both)
FAST_ACCUM_GRADIENTS = False


def rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in e4m3, fp32 scale per row) with rows ≈ codes·scale."""
    amax = t.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def fits_kernel(out_features: int, in_features: int) -> bool:
    return out_features % TILE == 0 and in_features % TILE == 0


def kernel_available(device: torch.device) -> bool:
    """torch._scaled_mm with FP8 needs compute capability 8.9 (Ada) or 9.0 (Hopper) and up."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def reference_mm(a8, a_scale, b8, b_scale, out_dtype) -> torch.Tensor:
    """(a8·a_scale)·(b8·b_scale)ᵀ in fp32: what the kernel computes, on any device."""
    return _cast((a8.float() * a_scale) @ (b8.float() * b_scale).t(), out_dtype)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`, without a .to() that changes nothing: under torch 2.11's torch.compile, an autograd.Function
    whose forward ends in such a no-op .to() gets a zero input gradient (torch 2.13 is right either way)."""
    return t if t.dtype == dtype else t.to(dtype)


def scaled_mm(a8, a_scale, b8, b_scale, out_dtype, fast_accum: bool = False) -> torch.Tensor:
    """a·bᵀ from row-scaled codes: a8 (M, K) with a_scale (M, 1), b8 (N, K) with b_scale (N, 1) -> (M, N).
    fast_accum: Hopper's faster, less precise FP8 accumulation (the forward pass; gradients accumulate exactly)."""
    if not kernel_available(a8.device):
        return reference_mm(a8, a_scale, b8, b_scale, out_dtype)
    rows = a8.shape[0]
    pad = -rows % TILE
    if pad:  # the kernel wants M to be a multiple of 16 too
        a8 = torch.cat([a8, a8.new_zeros(pad, a8.shape[1])])
        a_scale = torch.cat([a_scale, a_scale.new_ones(pad, 1)])
    out = torch._scaled_mm(a8, b8.t(), scale_a=a_scale, scale_b=b_scale.reshape(1, -1), out_dtype=torch.bfloat16,
                           use_fast_accum=fast_accum)
    return _cast(out[:rows] if pad else out, out_dtype)


class _FrozenFp8Linear(torch.autograd.Function):
    """y = x·Wᵀ with W given as its two FP8 forms; the gradient flows to x only."""

    @staticmethod
    def forward(ctx, x, w8, w_scale, wt8, wt_scale, out_dtype):
        x8, x_scale = rowwise(x)
        ctx.save_for_backward(wt8, wt_scale)
        ctx.x_dtype = x.dtype
        return scaled_mm(x8, x_scale, w8, w_scale, out_dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, grad):
        wt8, wt_scale = ctx.saved_tensors
        g8, g_scale = rowwise(grad)
        grad_x = scaled_mm(g8, g_scale, wt8, wt_scale, ctx.x_dtype, fast_accum=FAST_ACCUM_GRADIENTS)
        return grad_x, None, None, None, None, None


class Fp8Weight(torch.nn.Module):
    """The two FP8 forms of one frozen weight (buffers, so .to() moves them; left out of state_dict: they are
    derived from the weight). forward(x, bias) = x·Wᵀ + b on the FP8 kernels."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        for name, form in self._forms(weight).items():
            self.register_buffer(name, form, persistent=False)

    @staticmethod
    def _forms(weight: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            w8, w_scale = rowwise(weight)
            wt8, wt_scale = rowwise(weight.t().contiguous())
        return {"w8": w8, "w_scale": w_scale, "wt8": wt8.contiguous(), "wt_scale": wt_scale}

    def remake(self, weight: torch.Tensor) -> None:
        """Make the FP8 forms again from `weight` (changed since: load_state_dict), on the device they are on."""
        for name, form in self._forms(weight).items():
            self._buffers[name] = form.to(self._buffers[name].device)

    def _apply(self, fn, recurse=True):
        """.to(device) moves the FP8 forms; .to(dtype) / .half() must not cast them (e4m3 codes in bf16 are no
        longer a _scaled_mm operand, and fp32 scales in bf16 lose precision): a buffer whose dtype `fn` changed is
        moved to the new device in its own dtype instead."""
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the forward pass multiplies by (codes times scales)."""
        return (self.w8.float() * self.w_scale).to(dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        out = _FrozenFp8Linear.apply(x2, self.w8, self.w_scale, self.wt8, self.wt_scale, dtype)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out + bias.to(out.dtype) if bias is not None else out
