"""PEFT's `target_parameters` LoRA (ParamWrapper, peft >= 0.17) and lora_fx's LoRA on a bare parameter, both ways.

PEFT wraps the module that owns the parameter; several targeted parameters of one module nest, the first in the
module's own parameter order innermost. So in a file the LoRA of the i-th of n targeted parameters of module M is
under `M` + ".base_layer" * (n - 1 - i) (Qwen3-MoE's experts: gate_up_proj at `experts.base_layer`, down_proj at
`experts`). Its tensors, for a parameter W of shape (E, d1, d2) (E = 1 for a 2-D weight, shape (d1, d2)):

    lora_A.weight (r·E, in)    expert e's A = rows e·r .. e·r + r
    lora_B.weight (out, r·E)   expert e's B = columns e, e + E, e + 2E, ... (the expert index runs fastest)

with in = d2, out = d1 and W[e] += s·B_e·A_e, or, when the module says `is_transposed = True`, in = d1, out = d2
and W[e] += s·(B_e·A_e)ᵀ. A 2-D weight is PEFT's plain Linear layout (A (r, d2), B (d1, r)).

lora_fx keeps A (E, r, in) and B (E, out, r) in the layout its graph found (how the op reads W): when PEFT reads the
parameter the other way (a module computing x @ W[e] without is_transposed), PEFT's A and B are lora_fx's B and A
transposed, with the same delta.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_fx.site import IN_OUT, OUT_IN

BASE_LAYER = ".base_layer"


def strip_base_layer(path: str) -> str:
    """A wrapper path in a PEFT file -> the module that owns the parameter."""
    return path.replace(BASE_LAYER, "")


def targets_parameter(target_parameters: list[str], weight: str) -> bool:
    """PEFT's match of a parameter's full name against target_parameters (equal, or ending with "." + entry)."""
    return any(weight == t or weight.endswith("." + t) for t in target_parameters)


def targeted_in_order(model: nn.Module, module: str, wanted) -> list[str]:
    """The names of `module`'s own parameters that `wanted(full name)` selects, in the module's parameter order
    (PEFT's nesting order)."""
    owner = model.get_submodule(module)
    return [name for name, _ in owner.named_parameters(recurse=False) if wanted(f"{module}.{name}")]


def parameter_of(model: nn.Module, path: str, target_parameters: list[str]) -> str | None:
    """The full name of the parameter whose LoRA a file keeps under wrapper path `path`, or None."""
    module = strip_base_layer(path)
    try:
        names = targeted_in_order(model, module, lambda w: targets_parameter(target_parameters, w))
    except AttributeError:
        return None
    depth = path.count(BASE_LAYER)
    return f"{module}.{names[len(names) - 1 - depth]}" if depth < len(names) else None


def wrapper_path(module: str, names: list[str], name: str) -> str:
    """Where PEFT keeps the LoRA of parameter `name` among the targeted `names` of `module`."""
    return module + BASE_LAYER * (len(names) - 1 - names.index(name))


def peft_layout(model: nn.Module, weight: str) -> str:
    """How PEFT reads a parameter: a 2-D one as (out, in); a 3-D one as (E, out, in), or (E, in, out) when its
    module says is_transposed."""
    module = model.get_submodule(weight.rpartition(".")[0])
    three_d = model.get_parameter(weight).dim() == 3
    return IN_OUT if three_d and getattr(module, "is_transposed", False) else OUT_IN


def from_peft(a: torch.Tensor, b: torch.Tensor, num_experts: int, peft: str, ours: str) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """PEFT's (r·E, in) and (out, r·E) -> lora_fx's A (E, r, in) and B (E, out, r); a 2-D weight (num_experts=0)
    gives 2-D A (r, in) and B (out, r)."""
    e = max(num_experts, 1)
    a3 = a.reshape(e, a.shape[0] // e, a.shape[1])
    b3 = b.reshape(b.shape[0], b.shape[1] // e, e).permute(2, 0, 1)
    if peft != ours:  # the same delta read the other way: A' = Bᵀ, B' = Aᵀ per expert
        a3, b3 = b3.transpose(1, 2), a3.transpose(1, 2)
    if num_experts == 0:
        a3, b3 = a3[0], b3[0]
    return a3.contiguous(), b3.contiguous()


def to_peft(a: torch.Tensor, b: torch.Tensor, peft: str, ours: str) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_fx's A (E, r, in), B (E, out, r) (or 2-D) -> PEFT's (r·E, in), (out, r·E)."""
    if a.dim() == 2:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if peft != ours:
        a, b = b.transpose(1, 2), a.transpose(1, 2)
    e, r = a.shape[0], a.shape[1]
    return a.reshape(e * r, a.shape[2]).contiguous(), b.permute(1, 2, 0).reshape(b.shape[1], r * e).contiguous()
