"""The LoRA branch of an expert weight: one A and one B per expert, applied with the base's own routing.

    W: (num_experts, out, in) read as OUT_IN (or (num_experts, in, out), IN_OUT)
    A: (num_experts, r, in)    B: (num_experts, out, r)    delta W[e] = s · B[e]·A[e]   (transposed for IN_OUT)

These are PEFT's `target_parameters` shapes per expert (PEFT stores A as one (r·E, in) matrix and B as (out, r·E) with
the expert index fastest; lora_fx.peft_experts converts). The branch never loops over experts in Python and never
builds W + B·A (PEFT's parametrization does, for every expert, at every forward):

    grouped  rows sorted by expert, offs:  h = grouped_mm(x, Aᵀ, offs); d = grouped_mm(h, Bᵀ, offs)
    x_first  y = x·W[i]ᵀ (i an index or ids):  d = (x·A[i]ᵀ)·B[i]ᵀ                 (gathers r·in per row, not out·in)
    w_first  y = W[ids]·x:                      d = B[ids]·(A[ids]·x)

The branch runs in the activation's dtype (A and B cast to it, as autocast would; they are kept in fp32 when the base
is 16-bit): grouped matmul kernels take one dtype, and the base already runs in it. torch._grouped_mm runs where it
can (bf16 on CUDA sm80+, CPU; bf16 only under torch.compile; strides a multiple of 16 bytes); elsewhere the rows gather their expert's A and B and
run a batched matmul, with the same result.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lora_fx.lora import lora_scaling
from lora_fx.site import IN_OUT, OUT_IN


def _aligned(dtype: torch.dtype, *sizes: int) -> bool:
    return all((n * dtype.itemsize) % 16 == 0 for n in sizes)


def can_group(x: torch.Tensor, r: int, out: int) -> bool:
    """Whether torch._grouped_mm runs this branch (forward and backward) on x's device and dtype."""
    if not hasattr(torch, "_grouped_mm") or not _aligned(x.dtype, x.shape[-1], r, out):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # its meta kernel (what torch.compile traces with) takes bf16 only
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu"


def experts_of_rows(offs: torch.Tensor, rows: int) -> torch.Tensor:
    """The expert of each row of a grouped input (offs: cumulative row counts per expert)."""
    ids = torch.searchsorted(offs, torch.arange(rows, device=offs.device, dtype=offs.dtype), right=True)
    return ids.clamp_(max=offs.shape[0] - 1)  # rows past offs[-1] belong to no expert; the base leaves them alone


class LoraExperts(nn.Module):
    """Low-rank update of every expert of a 3-D expert weight; returns the branch output only."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, *, r: int, alpha: float,
                 dropout: float = 0.0, scaling: str = "standard", init: str = "kaiming", weight_name: str = "",
                 weight_layout: str = OUT_IN, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.r, self.alpha, self.scaling_kind = r, float(alpha), scaling
        self.scaling = lora_scaling(r, alpha, scaling)
        self.weight_name, self.weight_layout, self.rows, self.output_rows = weight_name, weight_layout, (), None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled, self.roles = True, ()
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r, dtype=dtype, device=device))
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "kaiming") -> None:
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:  # PEFT's: kaiming-uniform over its (r·E, in) matrix, the same bound as per expert (fan_in = in)
                nn.init.kaiming_uniform_(self.lora_A.view(-1, self.in_features), a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @property
    def output_features(self) -> int:
        return self.out_features

    def forward(self, x: torch.Tensor, select: torch.Tensor | int, form: str) -> torch.Tensor:
        """form: "grouped" (select = offs), "x_first" (select = an expert index or per-row ids; y = x·W[i]ᵀ) or
        "w_first" (select = per-row ids; y = W[ids]·x, x a column per row)."""
        if not self.enabled:
            shape = (*x.shape[:-2], self.out_features, x.shape[-1]) if form == "w_first" else \
                (*x.shape[:-1], self.out_features)
            return x.new_zeros(shape)
        h = self.dropout(x)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        if form == "grouped":
            if can_group(x, self.r, self.out_features):
                down = torch._grouped_mm(h, a.transpose(1, 2), offs=select)
                return torch._grouped_mm(down, b.transpose(1, 2), offs=select) * self.scaling
            ids = experts_of_rows(select, x.shape[0])
            down = torch.bmm(h.unsqueeze(1), a[ids].transpose(1, 2))  # (S, 1, r)
            return torch.bmm(down, b[ids].transpose(1, 2)).squeeze(1) * self.scaling
        a, b = a[select], b[select]
        if form == "w_first":
            return torch.matmul(b, torch.matmul(a, h)) * self.scaling
        return torch.matmul(torch.matmul(h, a.transpose(-1, -2)), b.transpose(-1, -2)) * self.scaling

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scaling · B·A per expert in `dtype`, laid out like the base weight."""
        delta = torch.bmm(self.lora_B.detach().to(dtype), self.lora_A.detach().to(dtype)) * self.scaling
        return delta.transpose(1, 2) if self.weight_layout == IN_OUT else delta

    def add_delta_(self, total: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """total += alpha · scaling · B[e]·A[e] for every expert, in place (one batched GEMM, total's dtype)."""
        a = self.lora_A.detach().to(total.device, total.dtype)
        b = self.lora_B.detach().to(total.device, total.dtype)
        if self.weight_layout == IN_OUT:
            return total.baddbmm_(a.transpose(1, 2), b.transpose(1, 2), alpha=alpha * self.scaling)
        return total.baddbmm_(b, a, alpha=alpha * self.scaling)

    def extra_repr(self) -> str:
        return (f"{self.weight_name}: {self.num_experts} experts, in={self.in_features}, out={self.out_features}, "
                f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}")
