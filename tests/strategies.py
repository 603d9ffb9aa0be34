"""Hypothesis strategies for the property tests: small random models and random rule sets.

A model is drawn as a plain `Spec` (so hypothesis can print and shrink it) and built by `build`. Every linear
site is one of three op kinds:
  * "module":     an nn.Linear submodule            (fc<i>.weight, (out, in))
  * "functional": F.linear on a bare parameter     (w<i>, (out, in); bias b<i> optional)
  * "matmul":     x @ W on a bare parameter         (w<i> stored (in, out); bias added as `+ b<i>`)
An MLP is 1-3 such layers of widths 4-24 with ReLU between; an attention block is q/k/v/o projections (each of a
random op kind) around softmax attention, followed by a 1-3 layer MLP back to the model width. Optionally one
square weight ("shared") is used at two sites of the forward. Models are fp32 or bf16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import lora_fx
from lora_fx import Rule

OP_KINDS = ("module", "functional", "matmul")
WIDTHS = st.integers(4, 24)


@dataclass(frozen=True)
class Layer:
    kind: str  # one of OP_KINDS
    d_in: int
    d_out: int
    bias: bool


@dataclass(frozen=True)
class Spec:
    arch: str  # "mlp" or "attn"
    d: int  # model (input) width
    attn: tuple[Layer, ...] = ()  # q, k, v, o (arch == "attn")
    mlp: tuple[Layer, ...] = ()
    shared: str | None = None  # op kind of the weight used at two sites, or None
    dtype: str = "float32"
    seed: int = 0
    batch: tuple[int, ...] = (2, 3)  # leading dims of the input

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


class GenModel(nn.Module):
    """A model built from a Spec; every layer is an nn.Linear or a bare (weight, bias) pair used functionally."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        self._names: list[str] = []
        for i, layer in enumerate(spec.attn + spec.mlp):
            self._names.append(self._make(i, layer))
        if spec.shared is not None:
            self._make("s", Layer(spec.shared, spec.mlp[-1].d_out, spec.mlp[-1].d_out, False))
        if spec.arch == "attn":
            self.scale = 1.0 / spec.d ** 0.5
        self.norm = nn.LayerNorm(spec.d)  # a buffer-free module that is not a site
        self.register_buffer("offset", torch.linspace(-0.1, 0.1, spec.d))  # a buffer adapt must not touch

    def _make(self, i, layer: Layer) -> str:
        if layer.kind == "module":
            setattr(self, f"fc{i}", nn.Linear(layer.d_in, layer.d_out, bias=layer.bias))
            return f"fc{i}"
        shape = (layer.d_out, layer.d_in) if layer.kind == "functional" else (layer.d_in, layer.d_out)
        setattr(self, f"w{i}", nn.Parameter(torch.randn(*shape) / layer.d_in ** 0.5))
        if layer.bias:
            setattr(self, f"b{i}", nn.Parameter(torch.randn(layer.d_out) * 0.1))
        return f"w{i}"

    def _site(self, i, kind: str, x):
        if kind == "module":
            return getattr(self, f"fc{i}")(x)
        w, b = getattr(self, f"w{i}"), getattr(self, f"b{i}", None)
        if kind == "functional":
            return F.linear(x, w, b)
        y = x @ w
        return y if b is None else y + b

    def forward(self, x):
        spec = self.spec
        x = self.norm(x + self.offset)
        n = len(spec.attn)
        if spec.arch == "attn":
            q, k, v = (self._site(i, spec.attn[i].kind, x) for i in range(3))
            a = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1) @ v
            x = x + self._site(3, spec.attn[3].kind, a)
        h = x
        for j, layer in enumerate(spec.mlp):
            h = self._site(n + j, layer.kind, h)
            if j < len(spec.mlp) - 1:
                h = torch.relu(h)
        if spec.shared is not None:  # one weight, two call sites
            h = self._site("s", spec.shared, h)
            h = h + self._site("s", spec.shared, torch.tanh(h))
        return h


def build(spec: Spec) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(spec.seed)
    model = GenModel(spec).to(spec.torch_dtype).eval()
    x = torch.randn(*spec.batch, spec.d).to(spec.torch_dtype)
    return model, (x,)


@st.composite
def layers(draw, d_in: int, d_out_last: int | None, depth: int) -> tuple[Layer, ...]:
    out, width = [], d_in
    for j in range(depth):
        d_out = d_out_last if (j == depth - 1 and d_out_last is not None) else draw(WIDTHS)
        out.append(Layer(draw(st.sampled_from(OP_KINDS)), width, d_out, draw(st.booleans())))
        width = d_out
    return tuple(out)


@st.composite
def specs(draw, dtypes=("float32", "bfloat16")) -> Spec:
    arch = draw(st.sampled_from(("mlp", "attn")))
    d = draw(WIDTHS)
    depth = draw(st.integers(1, 3))
    attn = ()
    if arch == "attn":
        attn = tuple(Layer(draw(st.sampled_from(OP_KINDS)), d, d, draw(st.booleans())) for _ in range(4))
        mlp = draw(layers(d, d, depth))  # residual-free MLP back to width d
    else:
        mlp = draw(layers(d, None, depth))
    shared = draw(st.one_of(st.none(), st.sampled_from(("module", "functional", "matmul"))))
    return Spec(arch=arch, d=d, attn=attn, mlp=mlp, shared=shared, dtype=draw(st.sampled_from(dtypes)),
                seed=draw(st.integers(0, 2**16)), batch=draw(st.sampled_from(((2, 3), (3,), (1, 4)))))


# ------------------------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class WeightInfo:
    weight: str  # qualified weight name
    names: tuple[str, ...]  # the site names users see (module or bare weight)
    ops: tuple[str, ...]  # lora_fx op kinds of its sites
    limit: int  # min(in, out): the largest r


def weights_of(model: nn.Module, args: tuple) -> list[WeightInfo]:
    """The real candidate sites of a model, grouped by weight (from lora_fx.plan)."""
    by_weight: dict[str, list] = {}
    for d in lora_fx.plan(model, example_inputs=args).decisions:
        by_weight.setdefault(d.site.weight, []).append(d.site)
    return [WeightInfo(w, tuple(sorted({s.name for s in sites})), tuple(sorted({s.op for s in sites})),
                       min(min(s.in_features, s.out_features) for s in sites)) for w, sites in by_weight.items()]


@st.composite
def rule_sets(draw, infos: list[WeightInfo]) -> list[Rule] | None:
    """None, or a list of Rules whose name regexes come from the model's site names; at least one site is adapted.

    Each adapting rule selects whole weights (every site of a shared weight gets the same rule, so one weight never
    gets two different ranks) with r in 1..min(in, out) over the weights it selects; an optional leading exclude
    rule removes one weight; rules may add an op selector that the weights' sites have.
    """
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter of the time: rules=None
        return None
    n = len(infos)
    order = draw(st.permutations(range(n)))
    excluded = order[0] if n > 1 and draw(st.booleans()) else None
    chosen = [i for i in order if i != excluded][:draw(st.integers(1, max(1, n - (excluded is not None))))]
    rules: list[Rule] = []
    if excluded is not None:
        rules.append(Rule(name="|".join(re.escape(s) for s in infos[excluded].names), exclude=True))
    # group the chosen weights into 1-3 rules
    k = draw(st.integers(1, min(3, len(chosen))))
    groups = [chosen[i::k] for i in range(k)]
    for group in groups:
        names = [nm for i in group for nm in infos[i].names]
        limit = min(infos[i].limit for i in group)
        ops = set.intersection(*(set(infos[i].ops) for i in group))
        kwargs = {}
        if ops and draw(st.booleans()):
            kwargs["op"] = draw(st.sampled_from(sorted(ops)))
        if draw(st.booleans()):
            kwargs["alpha"] = draw(st.sampled_from((1.0, 4.0, 16.0, 0.5)))
        rules.append(Rule(name="|".join(re.escape(nm) for nm in names), r=draw(st.integers(1, limit)), **kwargs))
    return rules


@st.composite
def cases(draw, dtypes=("float32", "bfloat16")):
    """(spec, model, args, rules, r default): a model, its inputs, and rules valid for it."""
    spec = draw(specs(dtypes))
    model, args = build(spec)
    infos = weights_of(model, args)
    rules = draw(rule_sets(infos))
    default_r = min(i.limit for i in infos)  # rules=None adapts every site with the default r
    return spec, model, args, rules, draw(st.integers(1, min(default_r, 8)))
