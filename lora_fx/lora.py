"""The LoRA branches: (alpha / r) · B · A · dropout(x), one module per adapted weight, one class per kind of site.

    LoraLinear     y = x·Wᵀ         branch = s · (dropout(x)·Aᵀ)·Bᵀ          delta W = s · B·A
    LoraConv       y = conv(x, W)   branch = s · conv1x1(conv(x, A), B)      delta W = s · B∘A   (A: the layer's kernel)
    LoraEmbedding  y = W[ids]       branch = s · Aᵀ[ids]·Bᵀ                  delta W = s · (B·A)ᵀ

A weight used at several call sites gets one branch module; the inject pass calls it beside each site. Shapes are
PEFT's (A: (r, in, *kernel) or (r, num_embeddings); B: (out, r, *1) or (dim, r)), so adapter files map one to one.
A starts kaiming-uniform (normal for embeddings, as PEFT) and B at zero (Hu et al., 2021), so an adapted model
starts exactly equal to the original. LoRA weights are kept in fp32 when the base weight is fp16/bf16 (as PEFT
does): low-precision adapters train badly. `add_delta_` is the fold math: total += alpha · delta W, in place.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_fx.site import IN_OUT, OUT_IN

SCALINGS = ("standard", "rslora")
INITS = ("kaiming", "gaussian")


def lora_scaling(r: int, alpha: float, scaling: str = "standard") -> float:
    """alpha / r as in the paper, or alpha / sqrt(r) for rank-stabilised LoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(r) if scaling == "rslora" else alpha / r


class LoraLinear(nn.Module):
    """Low-rank update of one weight; returns the branch output only (the inject pass adds it to the base output)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        scaling: str = "standard",
        init: str = "kaiming",
        weight_name: str = "",
        weight_layout: str = OUT_IN,
        rows: tuple[tuple[int, int], ...] = (),
        output_rows: tuple[int, int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        """rows: for a slice of a packed weight (q of a fused qkv), the output rows this LoRA updates;
        B then has one row per updated row and the branch writes zeros elsewhere (loralib's MergedLinear).
        output_rows: when the site's op reads only rows (start, end) of the weight (a split before F.linear), the
        branch returns just those rows; delta_weight stays weight-shaped."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.scaling_kind = r, float(alpha), scaling
        self.scaling = lora_scaling(r, alpha, scaling)
        self.weight_name, self.weight_layout = weight_name, weight_layout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # a disabled branch adds nothing (lora_fx.set_adapter / disable_adapters)
        self.roles: tuple[str, ...] = ()  # the graph roles a rule selected this weight (or slice) by, if any
        # None: the matmuls run in A's dtype (fp32 beside a bf16 base, as PEFT); a dtype (bf16): they run in it and
        # A, B stay the fp32 master weights the optimizer updates (autocast's recipe; quantize_base("fp8") sets it)
        self.compute_dtype: torch.dtype | None = None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.rows = tuple(tuple(r) for r in rows)
        self.output_rows = tuple(output_rows) if output_rows is not None else None
        index = [i for start, end in self.rows for i in range(start, end)]
        self.register_buffer("row_index", torch.tensor(index, dtype=torch.long, device=device) if index else None,
                             persistent=False)
        self.lora_B = nn.Parameter(torch.zeros(len(index) or out_features, r, dtype=dtype, device=device))
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "kaiming") -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:  # what nn.Linear (and the paper's code) use for A
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x.new_zeros(*x.shape[:-1], self.output_features)
        b = self._output_B()
        if torch.is_autocast_enabled(x.device.type):
            # autocast runs both matmuls in its dtype anyway: casting x to fp32 first would only make (and save
            # for backward) one more copy of the activation per site. The output stays in the autocast dtype like
            # the base op's, so the sum does not upcast the model's activations to fp32
            return F.linear(F.linear(self.dropout(x), self.lora_A), b) * self.scaling
        dtype = self.compute_dtype or self.lora_A.dtype
        h = self.dropout(x).to(dtype)
        return (F.linear(F.linear(h, self.lora_A.to(dtype)), b.to(dtype)) * self.scaling).to(x.dtype)

    @property
    def output_features(self) -> int:
        """Features of the branch's output: the site's (out_features, or the rows it reads)."""
        return self.out_features if self.output_rows is None else self.output_rows[1] - self.output_rows[0]

    def _output_B(self) -> torch.Tensor:
        """B for the rows the branch returns: B itself when its rows are exactly those (every plain LoRA, and a
        site that reads a slice of its weight), else B placed among zero rows."""
        if self.row_index is None or self.rows == (self.output_rows,):
            return self.lora_B
        full = self._full_B()
        return full if self.output_rows is None else full[self.output_rows[0]:self.output_rows[1]]

    def _full_B(self) -> torch.Tensor:
        """B with zero rows outside the slice (out x r: as small as B itself, so cheap)."""
        if self.row_index is None:
            return self.lora_B
        return self.lora_B.new_zeros(self.out_features, self.r).index_copy(0, self.row_index, self.lora_B)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scaling · B · A in `dtype`, laid out like the base weight (transposed for IN_OUT weights)."""
        delta = (self._full_B().detach().to(dtype) @ self.lora_A.detach().to(dtype)) * self.scaling
        return delta.T if self.weight_layout == IN_OUT else delta

    def add_delta_(self, total: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """total += alpha · scaling · B · A in place, in total's dtype and on its device: one GEMM that reads and
        writes `total` once (delta_weight would make the product, scale it and add it: three passes)."""
        B = self._full_B().detach().to(total.device, total.dtype)
        A = self.lora_A.detach().to(total.device, total.dtype)
        if self.weight_layout == IN_OUT:  # total is W.T-shaped: add (B·A).T = A.T·B.T
            return total.addmm_(A.T, B.T, alpha=alpha * self.scaling)
        return total.addmm_(B, A, alpha=alpha * self.scaling)

    def extra_repr(self) -> str:
        return (
            f"{self.weight_name}{f' rows {list(self.rows)}' if self.rows else ''}: in={self.in_features}, "
            f"out={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, scaling={self.scaling:g}"
        )


class LoraConv(nn.Module):
    """LoRA on a convolution (PEFT's layout): A is a conv with the layer's kernel, stride, padding and dilation
    (in -> r channels), B a 1x1 conv (r -> out). conv(x, W) + s·B(A(x)) = conv(x, W + s·B∘A) exactly, since B mixes
    channels after A. Grouped convolutions are not supported (B∘A would not be block-diagonal)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...], *, r: int, alpha: float,
                 stride: Any = 1, padding: Any = 0, dilation: Any = 1, dropout: float = 0.0,
                 scaling: str = "standard", init: str = "kaiming", weight_name: str = "",
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.r, self.alpha, self.scaling_kind = r, float(alpha), scaling
        self.scaling = lora_scaling(r, alpha, scaling)
        self.weight_name, self.weight_layout, self.rows, self.output_rows = weight_name, OUT_IN, (), None
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled, self.roles = True, ()
        ones = (1,) * len(self.kernel_size)
        self.lora_A = nn.Parameter(torch.empty(r, in_channels, *self.kernel_size, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_channels, r, *ones, dtype=dtype, device=device))
        self.reset_parameters(init)

    reset_parameters = LoraLinear.reset_parameters

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, **geometry: Any) -> torch.Tensor:
        conv = F.conv1d if len(self.kernel_size) == 1 else F.conv2d if len(self.kernel_size) == 2 else F.conv3d
        return conv(x, weight, **geometry)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            shape = self._conv(x[:1, :1].detach(), self.lora_A[:1, :1].detach(), stride=self.stride,
                               padding=self.padding, dilation=self.dilation).shape
            return x.new_zeros(x.shape[0], self.out_features, *shape[2:])
        autocast = torch.is_autocast_enabled(x.device.type)
        h = self.dropout(x) if autocast else self.dropout(x).to(self.lora_A.dtype)
        down = self._conv(h, self.lora_A, stride=self.stride, padding=self.padding, dilation=self.dilation)
        out = self._conv(down, self.lora_B) * self.scaling
        return out if autocast else out.to(x.dtype)

    @property
    def output_features(self) -> int:
        return self.out_features

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scaling · B∘A in `dtype`, shaped like the conv weight (out, in, *kernel)."""
        a, b = self.lora_A.detach().to(dtype), self.lora_B.detach().to(dtype)
        return (b.flatten(1) @ a.flatten(1)).view(self.out_features, self.in_features, *self.kernel_size) * self.scaling

    def add_delta_(self, total: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """total += alpha · scaling · B∘A in place, in total's dtype (one GEMM on the flattened kernel)."""
        a = self.lora_A.detach().to(total.device, total.dtype).flatten(1)
        b = self.lora_B.detach().to(total.device, total.dtype).flatten(1)
        total.view(self.out_features, -1).addmm_(b, a, alpha=alpha * self.scaling)
        return total

    def extra_repr(self) -> str:
        return (f"{self.weight_name}: in={self.in_features}, out={self.out_features}, kernel={self.kernel_size}, "
                f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}")


class LoraEmbedding(nn.Module):
    """LoRA on an embedding table (PEFT's layout): A (r, num_embeddings), B (dim, r); the branch looks ids up in
    Aᵀ and maps them by Bᵀ, so W[ids] + s·Aᵀ[ids]·Bᵀ = (W + s·(B·A)ᵀ)[ids]. No dropout: ids have nothing to drop."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, r: int, alpha: float, padding_idx: int | None = None,
                 dropout: float = 0.0, scaling: str = "standard", init: str = "kaiming", weight_name: str = "",
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = num_embeddings, embedding_dim
        self.r, self.alpha, self.scaling_kind = r, float(alpha), scaling
        self.scaling = lora_scaling(r, alpha, scaling)
        self.weight_name, self.weight_layout, self.rows, self.output_rows = weight_name, OUT_IN, (), None
        self.padding_idx = padding_idx
        self.dropout = nn.Identity()
        self.enabled, self.roles = True, ()
        self.lora_A = nn.Parameter(torch.empty(r, num_embeddings, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(embedding_dim, r, dtype=dtype, device=device))
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "kaiming") -> None:
        nn.init.normal_(self.lora_A)  # PEFT's embedding init: A normal, B zero (kaiming on ids makes no sense)
        nn.init.zeros_(self.lora_B)

    def forward(self, ids: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """The branch for `ids`; in the dtype of `like` (the table's output) when given, as PEFT's Embedding."""
        dtype = self.lora_B.dtype if like is None else like.dtype
        if not self.enabled:
            return self.lora_B.new_zeros(*ids.shape, self.out_features, dtype=dtype)
        rows = F.embedding(ids, self.lora_A.T, padding_idx=self.padding_idx)
        return ((rows @ self.lora_B.T) * self.scaling).to(dtype)

    @property
    def output_features(self) -> int:
        return self.out_features

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scaling · (B·A)ᵀ in `dtype`, shaped like the table (num_embeddings, dim)."""
        return (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)).T * self.scaling

    def add_delta_(self, total: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """total += alpha · scaling · (B·A)ᵀ = Aᵀ·Bᵀ, in place (one GEMM)."""
        a = self.lora_A.detach().to(total.device, total.dtype)
        b = self.lora_B.detach().to(total.device, total.dtype)
        return total.addmm_(a.T, b.T, alpha=alpha * self.scaling)

    def extra_repr(self) -> str:
        return (f"{self.weight_name}: num_embeddings={self.in_features}, dim={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}")
