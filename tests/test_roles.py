"""Role detection from graph structure, checked against the true projections (known here from module names only).

The roles pass never looks at names; these tests do, to know what the right answer is."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx.passes import packed_rows as P
from lora_fx.passes import roles as R
from lora_fx.passes.match import find_sites
from lora_fx.passes.trace import trace
from lora_fx.rules import LoraSettings, Rule, decide

Q, K, V, OUT, MLP = R.Q, R.K, R.V, R.OUT, R.MLP
QKV = {Q, K, V}


def true_roles(module: str) -> set[str]:
    """What a module is, from the names transformers / torch / the test models give it."""
    patterns = [
        (r"(q_proj|\.query|\.wq)$", {Q}), (r"(k_proj|\.key|\.wk)$", {K}), (r"(v_proj|\.value|\.wv)$", {V}),
        (r"(c_attn|\.qkv|^mha)$", QKV),  # packed q|k|v
        (r"(o_proj|attention\.output\.dense|attn\.c_proj|attn\.proj|out_proj|\.wo)$", {OUT}),
        (r"(mlp\.|intermediate\.dense$|layer\.\d+\.output\.dense$|\.fc\d$|^fc$)", {MLP}),
    ]
    for pattern, roles in patterns:
        if re.search(pattern, module):
            return roles
    return set()  # heads, poolers


def detect(gm, model, **packed_options):
    sites = find_sites(gm, model)
    found = R.find_roles(gm, sites)
    return sites, found, P.find_packed_rows(gm, sites, **packed_options)


def assert_roles_match_truth(sites, found):
    got = {s.module: set(found[s.node]) for s in sites}
    want = {s.module: true_roles(s.module) for s in sites}
    assert got == want
    present = set().union(*got.values())
    assert {Q, K, V, OUT} <= present  # not vacuous: every attention role was found somewhere


# ------------------------------------------------------------------------------------------------ transformers
def _hf_model(family: str, impl: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (1, 8))
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=32, attn_implementation=impl)
        return transformers.BertModel(cfg), (ids,), {}
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                                       attn_implementation=impl)
        return transformers.LlamaForCausalLM(cfg), (ids,), {"use_cache": False}
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      attn_implementation=impl)
        return transformers.GPT2LMHeadModel(cfg), (ids,), {"use_cache": False}
    if family == "vit":
        cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, attn_implementation=impl)
        return transformers.ViTModel(cfg), (torch.randn(1, 3, 16, 16),), {}
    raise AssertionError(family)


HF_CASES = [(f, i) for i in ("sdpa", "eager") for f in ("bert", "llama", "gpt2", "vit")]


@pytest.fixture(scope="module", params=HF_CASES, ids=[f"{f}-{i}" for f, i in HF_CASES])
def hf(request):
    family, impl = request.param
    model, args, kwargs = _hf_model(family, impl)
    gm = trace(model, args, kwargs, frontend="export").graph_module
    return family, impl, model, gm


def test_transformers_roles_match_the_true_projections(hf):
    family, impl, model, gm = hf
    sites, found, packed = detect(gm, model)
    assert_roles_match_truth(sites, found)
    att = R.find_attention(gm)
    assert att and {a.kind for a in att} == {"sdpa" if impl == "sdpa" else "eager"}
    if family == "gpt2":  # c_attn is a Conv1D (addmm) whose output is split into q, k, v
        c_attn = [s for s in sites if s.module.endswith("c_attn")]
        assert len(c_attn) == 2
        for s in c_attn:
            assert packed[s.node] == {Q: ((0, 32),), K: ((32, 64),), V: ((64, 96),)}
        assert P.find_packed_roles(gm, sites) == {s.node: {Q: (0, 32), K: (32, 64), V: (64, 96)} for s in c_attn}
    else:
        assert packed == {}  # separate projections are not packed


def test_transformers_heads_and_poolers_have_no_role(hf):
    family, _, model, gm = hf
    sites, found, _ = detect(gm, model)
    last = sites[-1]
    assert last.module in ("lm_head", "pooler.dense")
    assert found[last.node] == ()


# ------------------------------------------------------------------------------------------------ hand-written
def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class SeparateQKV(nn.Module):
    """q/k/v/o as separate Linears; sdpa, or einsum-softmax-matmul with rotary embeddings."""

    def __init__(self, d=32, heads=4, eager=False):
        super().__init__()
        self.heads, self.eager = heads, eager
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, cos, sin):
        b, n, c = x.shape
        q, k, v = (w(x).view(b, n, self.heads, c // self.heads).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        if self.eager:
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(c // self.heads)
            out = scores.softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, n, c))


class FusedQKV(nn.Module):
    """One qkv Linear (3*d outputs) taken apart in the ways real code does it."""

    def __init__(self, d=32, heads=4, style="unbind", eager=False):
        super().__init__()
        self.heads, self.style, self.eager = heads, style, eager
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, cos, sin):
        b, n, c = x.shape
        h, dh = self.heads, c // self.heads
        y = self.qkv(x)
        if self.style == "unbind":  # timm
            parts = y.reshape(b, n, 3, h, dh).permute(2, 0, 3, 1, 4).unbind(0)
            q, k, v = parts[0], parts[1], parts[2]
        elif self.style == "chunk":
            parts = y.chunk(3, dim=-1)
            q, k, v = (parts[i].view(b, n, h, dh).transpose(1, 2) for i in range(3))
        elif self.style == "index":
            y = y.reshape(b, n, 3, h, dh).permute(2, 0, 3, 1, 4)
            q, k, v = y[0], y[1], y[2]
        else:  # "interleaved": per head [q | k | v] (GPT-NeoX, Bloom)
            parts = y.view(b, n, h, 3 * dh).split(dh, dim=-1)
            q, k, v = (parts[i].transpose(1, 2) for i in range(3))
        if self.eager:
            out = ((q @ k.transpose(-2, -1)) * dh ** -0.5).softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, attn, d=32):
        super().__init__()
        self.ln1, self.ln2, self.attn = nn.LayerNorm(d), nn.LayerNorm(d), attn
        self.fc1, self.fc2 = nn.Linear(d, 64), nn.Linear(64, d)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln1(x), cos, sin)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Net(nn.Module):
    def __init__(self, make_attn, layers=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(make_attn()) for _ in range(layers))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        pos = torch.arange(8, dtype=torch.float32)[:, None] * torch.ones(8)[None, :]
        cos, sin = pos.cos(), pos.sin()
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(x)


HAND = {
    "separate-sdpa": lambda: Net(lambda: SeparateQKV()),
    "separate-einsum-rotary": lambda: Net(lambda: SeparateQKV(eager=True)),
    "fused-unbind-sdpa": lambda: Net(lambda: FusedQKV(style="unbind")),
    "fused-chunk-eager": lambda: Net(lambda: FusedQKV(style="chunk", eager=True)),
    "fused-index-eager": lambda: Net(lambda: FusedQKV(style="index", eager=True)),
    "fused-interleaved-sdpa": lambda: Net(lambda: FusedQKV(style="interleaved")),
}
X = torch.randn(2, 8, 32)


@pytest.fixture(scope="module", params=[(name, fe) for name in HAND for fe in ("fx", "export")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def hand(request):
    name, frontend = request.param
    torch.manual_seed(0)
    model = HAND[name]()
    traced = trace(model, (X,), frontend=frontend)
    assert traced.frontend == frontend
    return name, frontend, model, traced.graph_module


def test_hand_written_attention(hand):
    name, frontend, model, gm = hand
    sites, found, packed = detect(gm, model, example_inputs=(X,))
    assert_roles_match_truth(sites, found)
    qkv = [s for s in sites if s.module.endswith(".qkv")]
    if name.startswith("separate"):
        assert packed == {}
    elif "interleaved" in name:  # rows h*24 + [0, 8) are q, + [8, 16) k, + [16, 24) v
        for s in qkv:
            assert packed[s.node] == {role: tuple((h * 24 + o, h * 24 + o + 8) for h in range(4))
                                      for role, o in ((Q, 0), (K, 8), (V, 16))}
        assert P.find_packed_roles(gm, sites, example_inputs=(X,)) == {}  # not one block per role
    else:
        assert {s.node for s in qkv} == set(packed)
        for s in qkv:
            assert packed[s.node] == {Q: ((0, 32),), K: ((32, 64),), V: ((64, 96),)}


def test_symbolic_trace_without_shapes_finds_roles_but_no_rows():
    model = HAND["fused-chunk-eager"]()
    gm = trace(model, frontend="fx").graph_module
    sites = find_sites(gm, model)
    assert_roles_match_truth(sites, R.find_roles(gm, sites))
    lost = P.find_packed_rows(gm, sites)
    assert lost == {}  # no shapes: says nothing rather than guess
    assert set(lost.lost) == {s.node for s in sites if s.module.endswith("qkv")} and "no shape" in next(iter(lost.lost.values()))
    assert P.find_packed_rows(gm, sites, shapes=P.record_shapes(gm, (X,)))  # shapes from one run


def test_a_lost_row_map_is_recorded_and_shown_by_plan():
    """The rows of a fused qkv traced without example inputs cannot be followed: the site says why, and a role rule's
    plan row says that its LoRA covers the whole weight instead of the q rows."""
    model = HAND["fused-chunk-eager"]()
    gm = trace(model, frontend="fx").graph_module
    qkv = [s for s in R.with_roles(gm, find_sites(gm, model)) if s.module.endswith("qkv")]
    assert qkv and all(s.role_rows == () and "no shape" in s.rows_lost for s in qkv)
    plan = lora_fx.plan(model, [lora_fx.Rule(role="attn.q")], frontend="fx")
    rows = [r for r in plan.rows() if r["site"].endswith("qkv")]
    assert rows and all(r["adapted"] and "could not be followed (no shape" in r["why"] and "whole weight" in r["why"]
                        for r in rows)
    assert str(plan).count("whole weight") == len(rows)  # the printed plan says so, not only its reasons
    with pytest.warns(UserWarning, match="covers the whole weight"):  # and so does adapt
        lora_fx.adapt(model, [lora_fx.Rule(role="attn.q")], frontend="fx")


class RotatedGQA(nn.Module):
    """Phi-3's attention: one qkv Linear with fewer key/value heads (rows [q | k | v] of unequal sizes), each part
    viewed as heads and rotated on its first `rotary` features (rotate_half: slices, neg, cat), the rest passed."""

    def __init__(self, d=32, heads=4, kv_heads=2, rotary=4):
        super().__init__()
        self.heads, self.kv_heads, self.dh, self.rotary = heads, kv_heads, d // heads, rotary
        self.qkv, self.o = nn.Linear(d, d + 2 * kv_heads * self.dh), nn.Linear(d, d)

    def rope(self, t, cos, sin):
        rot, rest = t[..., :self.rotary], t[..., self.rotary:]
        half = self.rotary // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + rotated * sin, rest], dim=-1)

    def repeat_kv(self, t):  # transformers' repeat_kv: t[:, :, None] is a slice of the whole tensor, then more
        b, h, n, dh = t.shape
        groups = self.heads // self.kv_heads
        return t[:, :, None, :, :].expand(b, h, groups, n, dh).reshape(b, h * groups, n, dh)

    def forward(self, x, cos, sin):
        b, n, d = x.shape
        y = self.qkv(x)
        kv = self.kv_heads * self.dh
        q, k, v = y[..., :d], y[..., d:d + kv], y[..., d + kv:]
        q = self.rope(q.view(b, n, self.heads, self.dh).transpose(1, 2), cos, sin)
        k = self.rope(k.view(b, n, self.kv_heads, self.dh).transpose(1, 2), cos, sin)
        v = v.view(b, n, self.kv_heads, self.dh).transpose(1, 2)
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, n, d))


def test_packed_rows_of_unequal_parts_through_a_partial_rotary():
    """The rotated part of each head has its features mixed (rotate_half), and is sliced again: its rows are then
    an upper bound, which stays exact while q's, k's and v's bounds do not overlap (Phi-3 adapted the whole qkv
    weight for Rule(role='attn.q'), k and v rows included)."""
    torch.manual_seed(0)
    model = RotatedGQA()
    x, cos, sin = torch.randn(2, 6, 32), torch.randn(6, 4), torch.randn(6, 4)
    gm = trace(model, (x, cos, sin), frontend="export").graph_module
    sites, found, packed = detect(gm, model)
    qkv = next(s for s in sites if s.module == "qkv")
    assert packed[qkv.node] == {Q: ((0, 32),), K: ((32, 48),), V: ((48, 64),)} and not packed.lost
    adapted = lora_fx.adapt(model, lora_fx.Rule(role="attn.q"), example_inputs=(x, cos, sin), frontend="export")
    for p in lora_fx.lora_parameters(adapted):
        nn.init.normal_(p, std=0.1)
    changed = (lora_fx.fold(adapted).qkv.weight - model.qkv.weight).abs().sum(1) > 0
    assert changed.nonzero().flatten().tolist() == list(range(32))  # the q rows, and only they


# ------------------------------------------------------------------------------------------------ MultiheadAttention
class WithMHA(nn.Module):
    def __init__(self, need_weights: bool):
        super().__init__()
        self.mha, self.fc, self.need_weights = nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 32), \
            need_weights

    def forward(self, x):
        h = x + self.mha(x, x, x, need_weights=self.need_weights)[0]
        return h + self.fc(h)


@pytest.mark.parametrize("need_weights", [True, False], ids=["bmm-softmax", "sdpa"])
def test_multihead_attention_packed_in_proj(need_weights):
    torch.manual_seed(0)
    model = WithMHA(need_weights)
    gm = trace(model, (X,), frontend="export").graph_module
    sites, found, packed = detect(gm, model)
    by_module = {s.module: s for s in sites}
    in_proj, out_proj = by_module["mha"], by_module["mha.out_proj"]
    assert in_proj.weight == "mha.in_proj_weight" and in_proj.op == "functional_linear"
    assert found[in_proj.node] == (Q, K, V)
    assert found[out_proj.node] == (OUT,)
    assert found[by_module["fc"].node] == (MLP,)
    assert packed == {in_proj.node: {Q: ((0, 32),), K: ((32, 64),), V: ((64, 96),)}}


def test_transformer_encoder():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2),
                          nn.Linear(32, 3))
    gm = trace(model, (X,), frontend="export").graph_module
    sites, found, packed = detect(gm, model)
    roles = {s.module: found[s.node] for s in sites}
    for i in range(2):
        assert roles[f"0.layers.{i}.self_attn"] == (Q, K, V)  # in_proj_weight
        assert roles[f"0.layers.{i}.self_attn.out_proj"] == (OUT,)
        assert roles[f"0.layers.{i}.linear1"] == roles[f"0.layers.{i}.linear2"] == (MLP,)
    assert roles["1"] == ()
    assert len(packed) == 2 and all(p == {Q: ((0, 32),), K: ((32, 64),), V: ((64, 96),)} for p in packed.values())


# ------------------------------------------------------------------------------------------------ structure, not names
class NoProjectionAttention(nn.Module):
    """Attention straight on the residual stream: the fc before it is an MLP, not a q/k/v projection."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = x + self.fc(x)
        return self.head(F.scaled_dot_product_attention(h, h, h))


class PlainMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_roles_come_from_structure_not_names():
    model = NoProjectionAttention()
    gm = trace(model, (X,), frontend="fx").graph_module
    sites = find_sites(gm, model)
    assert R.find_roles(gm, sites) == {sites[0].node: (MLP,), sites[1].node: (OUT,)}  # head reads attention's output
    model = PlainMLP()
    gm = trace(model, (X,), frontend="fx").graph_module
    assert set(R.find_roles(gm, find_sites(gm, model)).values()) == {()}  # no attention, no residual: no roles


def test_with_roles_fills_sites_and_leaves_the_input_alone():
    model = HAND["separate-sdpa"]()
    gm = trace(model, (X,), frontend="fx").graph_module
    sites = find_sites(gm, model)
    filled = R.with_roles(gm, sites)
    assert [s.node for s in filled] == [s.node for s in sites]
    assert all(s.roles == () for s in sites)
    assert {s.module: s.roles for s in filled}["blocks.1.attn.wv"] == (V,)
    assert R.graph_of(gm).number_of_nodes() == len(gm.graph.nodes)


def test_with_roles_fills_role_rows_when_site_has_the_field():
    import dataclasses

    if "role_rows" not in {f.name for f in dataclasses.fields(lora_fx.Site)}:
        pytest.skip("Site has no role_rows field yet (proposed in lora_fx/site.py)")
    model = HAND["fused-chunk-eager"]()
    gm = trace(model, (X,), frontend="fx").graph_module
    filled = R.with_roles(gm, find_sites(gm, model), example_inputs=(X,))
    qkv = next(s for s in filled if s.module == "blocks.0.attn.qkv")
    assert dict(qkv.role_rows) == {Q: ((0, 32),), K: ((32, 64),), V: ((64, 96),)}
    assert next(s for s in filled if s.module == "blocks.0.attn.proj").role_rows == ()


# ------------------------------------------------------------------------------------------------ registry
def test_register_a_role_and_select_it_with_a_rule():
    import networkx as nx

    def head(gm, sites, graph):
        """Sites with a path to the output that passes no other site."""
        site_nodes = {s.node for s in sites}
        output = next(n.name for n in gm.graph.nodes if n.op == "output")
        g = graph.copy()
        return [s for s in site_nodes if nx.has_path(g.subgraph((set(g) - site_nodes) | {s}), s, output)]

    model = HAND["separate-sdpa"]()
    gm = trace(model, (X,), frontend="fx").graph_module
    sites = find_sites(gm, model)
    with pytest.raises(lora_fx.RuleError, match="unknown role 'head'") as info:
        decide(sites, [Rule(role="head")], LoraSettings())
    assert info.value.field == "role"
    R.register_role("head", head)
    try:
        assert "head" in R.known_roles()
        with pytest.raises(ValueError, match="already registered"):
            R.register_role("head", head)
        filled = R.with_roles(gm, sites)
        assert [s.module for s in filled if "head" in s.roles] == ["head"]
        decisions = decide(filled, [Rule(role="head", r=2)], LoraSettings())
        assert [d.site.module for d in decisions if d.adapted] == ["head"]
    finally:
        R.unregister_role("head")
    assert "head" not in R.known_roles()
    assert R.known_roles()[:5] == R.BUILTIN_ROLES


def test_unknown_role_suggests_the_nearest():
    with pytest.raises(lora_fx.RuleError, match=r"unknown role 'attn\.qq'.*attn\.q") as info:
        decide([], [Rule(role=["attn.qq"])], LoraSettings())
    assert "register_role" in str(info.value)


def test_unknown_role_in_a_rules_file_names_the_file_and_rule(tmp_path):
    from lora_fx.rules_file import load_rules

    path = tmp_path / "rules.json"
    path.write_text('{"rules": [{"name": "fc", "r": 2}, {"role": "attn.qq", "r": 4}]}')
    rules, _ = load_rules(path)
    with pytest.raises(lora_fx.RuleError, match="unknown role 'attn.qq'") as info:
        decide([], rules, LoraSettings())
    assert info.value.where == f"{path}: rule 1"
