"""The LoRA branch: (alpha / r) · B · A · dropout(x), one module per adapted weight.

A weight used at several call sites gets one `LoraLinear`; the inject pass calls it beside each site.
A starts kaiming-uniform and B at zero (Hu et al., 2021), so an adapted model starts exactly equal to the original.
LoRA weights are kept in fp32 when the base weight is fp16/bf16 (as PEFT does): low-precision adapters train badly.
"""

from __future__ import annotations

import math

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
        h = self.dropout(x).to(self.lora_A.dtype)
        return (F.linear(F.linear(h, self.lora_A), b) * self.scaling).to(x.dtype)

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
