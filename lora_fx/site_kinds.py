"""Kinds of site: one record per kind, the one place to add a new one.

A kind is a family of ops with the same LoRA math. Each record says how the match pass finds its sites, which
branch module carries its LoRA (and so its weight layout, delta and fold math: the module's `add_delta_`), which
ONNX pattern the ONNX-level fold knows it by, and what PEFT calls it:

    kind        ops (Site.op, Rule(op=...))                       branch         PEFT module types
    linear      linear_module functional_linear matmul conv1d     LoraLinear     Linear, Conv1D (GPT-2)
    conv        conv                                              LoraConv       Conv1d, Conv2d
    embedding   embedding                                         LoraEmbedding  Embedding
    experts     grouped x_first w_first                           LoraExperts    (target_parameters)

Linear sites are *implicit*: rules=None and rules that select by role, layer or shape take them. Convolutions and
embeddings are taken only by a rule that names them (`op=`, `module_type=`, `name=` or `glob=`): rules=None means
"every linear-like site", as PEFT's "all-linear" does, and a tied embedding must never be adapted by accident.
Expert sites (a 3-D parameter of num_experts slices, passes/match_experts.py) are implicit: in a mixture-of-experts
model they hold most of the weights, and each slice is a linear layer.

To add a kind: a matcher in passes/match.py (node -> Site), a branch module in lora_fx/lora.py (forward, add_delta_),
a record here; optionally an ONNX fold pattern (passes/onnx_fold_rule.py) and PEFT names. tests/test_site_kinds.py shows
what every kind must pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from lora_fx.lora import LoraConv, LoraEmbedding, LoraLinear
from lora_fx.lora_experts import LoraExperts
from lora_fx.passes.match import match_conv, match_embedding, match_linear
from lora_fx.passes.match_experts import match_experts, selector
from lora_fx.site import Site

if TYPE_CHECKING:
    from lora_fx.rules import LoraSettings


@dataclass(frozen=True)
class SiteKind:
    name: str
    ops: tuple[str, ...]  # the Site.op values of this kind
    match: Callable[..., tuple[Site, object] | None]  # match(gm, model, node) -> (site, weight argument) or None
    branch: type[nn.Module]  # the LoRA branch module class
    build: Callable[..., nn.Module]  # build(site, settings, base_weight, rows) -> branch module
    check: Callable[[Site], str | None]  # why a site of this kind cannot take a LoRA, or None
    implicit: bool  # taken by rules=None and by rules that do not name it
    peft_types: tuple[str, ...]  # module class names PEFT adapts this way
    peft_keys: tuple[str, str]  # PEFT's tensor names for A and B
    onnx_foldable: bool  # the ONNX-level fold (lora_fx.fold_onnx) has a pattern for its branches
    # what the branch takes beside x at a site: branch_inputs(site, node) -> (args, kwargs)
    branch_inputs: Callable[[Site, object], tuple[tuple, dict]] = lambda site, node: ((), {})


def _lora_dtype(weight: torch.Tensor) -> torch.dtype:
    """LoRA weights in the base's dtype when it is fp32 or wider, else fp32 (low-precision adapters train badly)."""
    return weight.dtype if weight.dtype.itemsize >= 4 else torch.float32


def _common(site: Site, s: LoraSettings, weight: torch.Tensor) -> dict:
    return dict(r=s.r, alpha=s.alpha, dropout=s.dropout, scaling=s.scaling, init=s.init, weight_name=site.weight,
                dtype=_lora_dtype(weight), device=weight.device)


def _linear(site: Site, s: LoraSettings, weight: torch.Tensor, rows: tuple = ()) -> LoraLinear:
    out_features = weight.shape[0] if site.weight_rows is not None else site.out_features
    return LoraLinear(site.in_features, out_features, weight_layout=site.weight_layout, rows=rows,
                      output_rows=site.weight_rows, **_common(site, s, weight))


def _conv(site: Site, s: LoraSettings, weight: torch.Tensor, rows: tuple = ()) -> LoraConv:
    return LoraConv(site.in_features, site.out_features, site.param("kernel_size"), stride=site.param("stride"),
                    padding=site.param("padding"), dilation=site.param("dilation"), **_common(site, s, weight))


def _embedding(site: Site, s: LoraSettings, weight: torch.Tensor, rows: tuple = ()) -> LoraEmbedding:
    common = _common(site, s, weight)
    common.pop("dropout")
    return LoraEmbedding(site.in_features, site.out_features, padding_idx=site.param("padding_idx"), **common)


def _experts(site: Site, s: LoraSettings, weight: torch.Tensor, rows: tuple = ()) -> LoraExperts:
    return LoraExperts(site.param("num_experts"), site.in_features, site.out_features,
                       weight_layout=site.weight_layout, **_common(site, s, weight))


def _expert_inputs(site: Site, node) -> tuple[tuple, dict]:
    """The routing the base op used (offs, or the expert index / ids), and how it reads the weight."""
    return (selector(node, site),), {"form": site.param("form")}


def _embedding_inputs(site: Site, node) -> tuple[tuple, dict]:
    """The table's output, so the branch adds in its dtype (ids carry none; an fp32 LoRA beside a bf16 table
    would otherwise turn every activation after it to fp32)."""
    return (), {"like": node}


def _check_conv(site: Site) -> str | None:
    if site.param("groups", 1) != 1:
        return (f"a grouped convolution (groups={site.param('groups')}): B∘A of one LoRA is not block-diagonal, so "
                f"no fold could keep the groups (PEFT cannot merge these either)")
    if site.param("padding_mode", "zeros") != "zeros":
        return f"padding_mode={site.param('padding_mode')!r}: only zero padding composes with a LoRA conv"
    return None


def _check_embedding(site: Site) -> str | None:
    if site.param("max_norm") is not None:
        return "max_norm renormalises the table in place on every lookup, so W0 + delta would be renormalised too"
    return None


KINDS: dict[str, SiteKind] = {k.name: k for k in [
    SiteKind("linear", ("linear_module", "functional_linear", "matmul", "conv1d"), match_linear, LoraLinear, _linear,
             lambda site: None, implicit=True, peft_types=("Linear", "NonDynamicallyQuantizableLinear", "Conv1D"),
             peft_keys=("lora_A", "lora_B"), onnx_foldable=True),
    SiteKind("conv", ("conv",), match_conv, LoraConv, _conv, _check_conv, implicit=False, peft_types=("Conv1d", "Conv2d"),
             peft_keys=("lora_A", "lora_B"), onnx_foldable=False),
    SiteKind("embedding", ("embedding",), match_embedding, LoraEmbedding, _embedding, _check_embedding, implicit=False,
             peft_types=("Embedding",), peft_keys=("lora_embedding_A", "lora_embedding_B"), onnx_foldable=False,
             branch_inputs=_embedding_inputs),
    SiteKind("experts", ("grouped", "x_first", "w_first"), match_experts, LoraExperts, _experts, lambda site: None,
             implicit=True, peft_types=(), peft_keys=("lora_A", "lora_B"), onnx_foldable=False,
             branch_inputs=_expert_inputs),
]}

BRANCHES: tuple[type[nn.Module], ...] = tuple(k.branch for k in KINDS.values())


def kind_of(site_or_op: Site | str) -> SiteKind:
    op = site_or_op if isinstance(site_or_op, str) else site_or_op.op
    for kind in KINDS.values():
        if op in kind.ops:
            return kind
    raise KeyError(f"no kind of site has op {op!r}")
