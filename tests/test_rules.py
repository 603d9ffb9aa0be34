"""Rules: every selector, precedence, defaults, malformed rules, rules files."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx import Rule, RuleError
from lora_fx.passes.match import find_sites
from lora_fx.passes.roles import with_roles
from lora_fx.passes.trace import trace
from lora_fx.rules import LoraSettings, coerce_rules, decide, explain_unused, rule_from_dict, unused_rules
from lora_fx.rules_file import dump_rules, dumps_toml, load_rules


# ------------------------------------------------------------------------------------------------ a model with every kind of site
class Conv1D(nn.Module):
    """GPT-2's layout: weight stored (in, out), applied with addmm."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        y = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return y.view(x.size(0), x.size(1), -1)


class Proj(nn.Module):
    """A custom module holding a weight it applies with F.linear."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)

    def forward(self, x):
        return F.linear(x, self.weight)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)  # linear_module, Linear
        self.v = Proj(16, 16)  # functional_linear, Proj
        self.up = Conv1D(16, 32)  # conv1d, 16 -> 32
        self.w_down = nn.Parameter(torch.randn(16, 32) / 32 ** 0.5)  # functional_linear, 32 -> 16

    def forward(self, x):
        h = x + self.q(x) + self.v(x)
        return h + F.linear(torch.relu(self.up(h)), self.w_down)


class SelNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(3))
        self.w_proj = nn.Parameter(torch.randn(16, 8) / 4)  # matmul x @ W: 16 -> 8, no layer
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x @ self.w_proj)


X = torch.randn(2, 5, 16)
ALL = [f"layers.{i}.{n}" for i in range(3) for n in ("q", "v", "up", "w_down")] + ["w_proj", "head"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SelNet()


def key(site) -> str:
    """The weight's name without ".weight": layers.0.q, layers.0.w_down (whose module is layers.0), w_proj."""
    return site.weight.removesuffix(".weight")


_SITES: dict[int, list] = {}


def chosen(model, rules, *, via_plan: bool = False, **kwargs) -> dict[str, int]:
    """Site -> r for every adapted site. via_plan: through the public dry run (trace + match + decide) each time;
    else decide() on the sites that run found once (the same matching, without tracing again)."""
    if via_plan or id(model) not in _SITES:
        plan = lora_fx.plan(model, rules, example_inputs=(X,), frontend="fx", **kwargs)
        _SITES[id(model)] = [d.site for d in plan.decisions]
        return {key(d.site): d.settings.r for d in plan.adapted}
    defaults = LoraSettings(**{k: v for k, v in kwargs.items() if k in ("r", "alpha", "dropout")})
    return {key(d.site): d.settings.r for d in decide(_SITES[id(model)], coerce_rules(rules), defaults)
            if d.adapted}


def names(model, rules, **kwargs) -> set[str]:
    return set(chosen(model, rules, **kwargs))


def test_the_model_has_every_kind_of_site(model):
    plan = lora_fx.plan(model, None, example_inputs=(X,), frontend="fx")
    sites = {key(d.site): d.site for d in plan.decisions}
    assert sorted(sites) == sorted(ALL)
    assert {s.op for s in sites.values()} == {"linear_module", "functional_linear", "matmul", "conv1d"}
    assert sites["layers.2.w_down"].module == "layers.2" and sites["layers.2.w_down"].layer == 2
    assert sites["w_proj"].layer is None


# ------------------------------------------------------------------------------------------------ selectors
@pytest.mark.parametrize("pattern, expected", [
    ("q", {"layers.0.q", "layers.1.q", "layers.2.q"}),  # a dotted suffix
    ("layers\\.1\\.q", {"layers.1.q"}),  # the whole name
    ("q|v", {f"layers.{i}.{n}" for i in range(3) for n in "qv"}),
    ("w_.*", {"layers.0.w_down", "layers.1.w_down", "layers.2.w_down", "w_proj"}),  # weight names count too
    ("q\\.weight", {"layers.0.q", "layers.1.q", "layers.2.q"}),
    ("1\\.q", {"layers.1.q"}),  # suffixes start at a dot
    ("ayers\\.1\\.q", set()),  # ... never inside a name segment
    ("Q", set()),  # case matters
])
def test_name_regex_whole_name_or_dotted_suffix(model, pattern, expected):
    assert names(model, [Rule(name=pattern)]) == expected


def test_a_rule_matching_nothing_adapts_nothing(model):
    with pytest.raises(lora_fx.NoSitesError, match="no rule matched"):
        lora_fx.adapt(model, [Rule(name="ayers\\.1\\.q")], example_inputs=(X,), frontend="fx")


@pytest.mark.parametrize("pattern, expected", [
    ("layers.1.*", {"layers.1.q", "layers.1.v", "layers.1.up", "layers.1.w_down"}),  # w_down by its weight name
    ("*.up", {"layers.0.up", "layers.1.up", "layers.2.up"}),
    ("layers.[02].q", {"layers.0.q", "layers.2.q"}),
    ("head", {"head"}),
    ("q", set()),  # glob is on the whole name: no suffix semantics
])
def test_glob(model, pattern, expected):
    assert names(model, [Rule(glob=pattern), Rule(name="nothing-else", exclude=True)]) == expected


@pytest.mark.parametrize("op, expected", [
    ("linear_module", {"layers.0.q", "layers.1.q", "layers.2.q", "head"}),
    ("conv1d", {"layers.0.up", "layers.1.up", "layers.2.up"}),
    ("functional_linear", {f"layers.{i}.{n}" for i in range(3) for n in ("v", "w_down")}),
    ("matmul", {"w_proj"}),
    (["matmul", "conv1d"], {"w_proj", "layers.0.up", "layers.1.up", "layers.2.up"}),
])
def test_op(model, op, expected):
    assert names(model, [Rule(op=op)]) == expected


@pytest.mark.parametrize("module_type, expected", [
    (Proj, {"layers.0.v", "layers.1.v", "layers.2.v"}),  # a class
    ("Proj", {"layers.0.v", "layers.1.v", "layers.2.v"}),  # its name
    (nn.Linear, {"layers.0.q", "layers.1.q", "layers.2.q", "head"}),
    ("Conv1D", {"layers.0.up", "layers.1.up", "layers.2.up"}),
    ("Layer", {"layers.0.w_down", "layers.1.w_down", "layers.2.w_down"}),  # the module owning a bare parameter
    (["Conv1D", Proj], {f"layers.{i}.{n}" for i in range(3) for n in ("up", "v")}),
])
def test_module_type_as_class_or_name(model, module_type, expected):
    assert names(model, [Rule(module_type=module_type)]) == expected


def test_in_and_out_features(model):
    assert names(model, [Rule(out_features=32)]) == {"layers.0.up", "layers.1.up", "layers.2.up"}
    assert names(model, [Rule(in_features=32)]) == {"layers.0.w_down", "layers.1.w_down", "layers.2.w_down"}
    assert names(model, [Rule(in_features=[8, 32])]) == {"layers.0.w_down", "layers.1.w_down", "layers.2.w_down",
                                                          "head"}
    assert names(model, [Rule(in_features=16, out_features=8)]) == {"w_proj"}


@pytest.mark.parametrize("layers, expected", [
    (1, {1}), (range(0, 2), {0, 1}), ([0, 2], {0, 2}), ("1:3", {1, 2}), (":1", {0}), (["0:1", 2], {0, 2}),
])
def test_layers_as_int_range_list_or_span(model, layers, expected):
    got = names(model, [Rule(layers=layers)])
    assert got == {f"layers.{i}.{n}" for i in expected for n in ("q", "v", "up", "w_down")}
    assert "head" not in got and "w_proj" not in got  # sites outside any layer have layer None


@pytest.mark.parametrize("layers", ["5:2", "3:3", range(4, 1), ["0:1", "2:2"]])
def test_an_empty_layer_span_is_an_error_not_a_rule_that_selects_nothing(layers):
    with pytest.raises(lora_fx.RuleError, match=r"hold no layer \(start >= stop\)"):
        Rule(layers=layers)


def test_selectors_combine_with_and(model):
    assert names(model, [Rule(name="q|v", layers=2, module_type=nn.Linear)]) == {"layers.2.q"}


# ------------------------------------------------------------------------------------------------ roles
class Attention(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(d, d) for _ in range(4))  # names say nothing
        self.e, self.f = nn.Linear(d, 32), nn.Linear(32, d)
        self.g = nn.Linear(d, 3)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = (m(x).view(n, t, 2, d // 2).transpose(1, 2) for m in (self.a, self.b, self.c))
        h = x + self.d(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))
        h = h + self.f(torch.relu(self.e(h)))
        return self.g(h)


@pytest.fixture(scope="module")
def attention_sites():
    torch.manual_seed(0)
    model = Attention()
    gm = trace(model, (X,), frontend="fx").graph_module
    return model, with_roles(gm, find_sites(gm, model))


@pytest.mark.parametrize("role, expected", [
    ("attn.q", {"a"}), ("attn.k", {"b"}), ("attn.v", {"c"}), ("attn.out", {"d"}), ("mlp", {"e", "f"}),
    (["attn.q", "attn.v"], {"a", "c"}),
])
def test_role(attention_sites, role, expected):
    _, sites = attention_sites
    decisions = decide(sites, [Rule(role=role, r=2)], LoraSettings())
    assert {d.site.name for d in decisions if d.adapted} == expected
    untaken = next(d for d in decisions if d.site.name == "g")
    assert "roles none do not include" in untaken.reason


def test_role_through_plan(attention_sites):
    model, _ = attention_sites
    plan = lora_fx.plan(model, [Rule(role=["attn.q", "attn.v"])], example_inputs=(X,), frontend="fx")
    if not any(row["roles"] for row in plan.rows()):
        pytest.skip("lora_fx.plan does not run the roles pass yet (api.py: with_roles after find_sites)")
    assert {d.site.name for d in plan.adapted} == {"a", "c"}


def test_matched_roles(attention_sites):
    _, sites = attention_sites
    a = next(s for s in sites if s.name == "a")
    packed = a.__class__(**{**a.to_dict(), "roles": ("attn.q", "attn.k", "attn.v")})  # as GPT-2's c_attn
    assert Rule(role=["attn.q", "attn.v"]).matched_roles(packed) == ("attn.q", "attn.v")
    assert Rule(name="a").matched_roles(packed) == ("attn.q", "attn.k", "attn.v")


# ------------------------------------------------------------------------------------------------ precedence
def test_first_matching_rule_wins(model):
    got = chosen(model, [Rule(name="q", r=2), Rule(layers=1, r=4), Rule(r=1)], via_plan=True)
    assert got["layers.1.q"] == 2 and got["layers.0.q"] == 2  # rule 0 took every q
    assert got["layers.1.v"] == 4 and got["layers.1.up"] == 4  # rule 1 the rest of layer 1
    assert got["layers.0.v"] == 1 and got["head"] == 1  # rule 2 everything else
    plan = lora_fx.plan(model, [Rule(name="q", r=2), Rule(layers=1, r=4), Rule(r=1)], example_inputs=(X,),
                        frontend="fx")
    assert {key(d.site): d.rule_index for d in plan.decisions}["layers.1.q"] == 0


def test_exclude_decides_no_lora(model):
    assert names(model, [Rule(name="head", exclude=True), Rule()], via_plan=True) == set(ALL) - {"head"}
    # a later exclude cannot take back what an earlier rule decided
    assert names(model, [Rule(name="head"), Rule(name="head", exclude=True)]) == {"head"}
    plan = lora_fx.plan(model, [Rule(layers=0, exclude=True), Rule(name="q")], example_inputs=(X,), frontend="fx")
    rows = {r["site"]: r for r in plan.rows()}
    assert rows["layers.0.q"]["rule"] == 0 and not rows["layers.0.q"]["adapted"]
    assert "excludes" in rows["layers.0.q"]["why"]
    assert rows["layers.1.q"]["adapted"] and rows["layers.1.v"]["rule"] is None


def test_no_rules_adapts_every_site(model):
    assert names(model, None) == set(ALL)


# ------------------------------------------------------------------------------------------------ defaults
def test_defaults_fill_unset_settings(model):
    plan = lora_fx.plan(model, [Rule(name="q", alpha=32), Rule(name="head", r=2, scaling="rslora", init="gaussian")],
                        example_inputs=(X,), frontend="fx", r=4, alpha=8, dropout=0.1)
    settings = {key(d.site): d.settings for d in plan.adapted}
    assert settings["layers.0.q"] == LoraSettings(r=4, alpha=32, dropout=0.1, scaling="standard", init="kaiming")
    assert settings["head"] == LoraSettings(r=2, alpha=8, dropout=0.1, scaling="rslora", init="gaussian")
    assert plan.parameters_added() == 3 * 4 * (16 + 16) + 2 * (8 + 4)


# ------------------------------------------------------------------------------------------------ malformed rules
@pytest.mark.parametrize("field, value", [
    ("name", "q("), ("name", 3), ("glob", ["a"]), ("op", "conv2d"), ("op", ["matmul", "einsum"]),
    ("module_type", 3), ("in_features", "16"), ("in_features", 0), ("out_features", [16, -1]),
    ("layers", 1.5), ("layers", "one"), ("layers", [0, "x"]), ("role", 3), ("role", ""), ("exclude", "yes"),
    ("r", 0), ("r", 2.0), ("r", True), ("alpha", 0), ("alpha", "16"), ("alpha", float("nan")),
    ("dropout", 1.0), ("dropout", -0.1), ("scaling", "sqrt"), ("init", "zeros"),
])
def test_each_malformed_field_is_named(field, value):
    with pytest.raises(RuleError) as info:
        Rule(**{field: value})
    assert info.value.field == field
    assert field in info.value.what
    with pytest.raises(RuleError) as info:  # from a dict, as read from a file: which rule, which field
        rule_from_dict({"name": "q", field: value}, where="rules.toml: rule 3")
    assert info.value.field == field and "rule 3" in info.value.where


def test_unknown_fields_and_non_rules():
    with pytest.raises(RuleError, match=r"unknown field\(s\) \['rank'\]") as info:
        rule_from_dict({"name": "q", "rank": 8}, where="rule 0")
    assert "fields are" in str(info.value)
    with pytest.raises(RuleError, match="table/object"):
        rule_from_dict(["q"], where="rule 0")
    with pytest.raises(RuleError, match="str"):
        lora_fx.plan(SelNet(), "q", example_inputs=(X,), frontend="fx")


def test_unused_rules_are_explained(model):
    plan = lora_fx.plan(model, [Rule(name="q"), Rule(name="q", r=2), Rule(name="qq_proj"), Rule(role="attn.v")],
                        example_inputs=(X,), frontend="fx")
    sites = [d.site for d in plan.decisions]
    assert unused_rules(plan.rules, plan.decisions) == [1, 2, 3]
    assert "earlier rules took them first" in explain_unused(plan.rules[1], sites)
    assert "nearest names" in explain_unused(plan.rules[2], sites)
    assert "no site with role ['attn.v']" in explain_unused(plan.rules[3], sites)


# ------------------------------------------------------------------------------------------------ rules files
EVERY_FIELD = [
    Rule(name="lm_head", exclude=True),
    Rule(glob="layers.*.q", op=["linear_module", "functional_linear"], module_type="Linear", in_features=16,
         out_features=[16, 32], layers=range(0, 2), role=["attn.q", "attn.v"], r=8, alpha=16.0, dropout=0.05,
         scaling="rslora", init="gaussian"),
    Rule(name=r"layers\.\d+\.(q|v)", r=4, alpha=1e-05),
    Rule(name='quote"and\\back\tslash', module_type=[Proj, "Conv1D"]),
]


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_rules_file_round_trip(tmp_path, suffix):
    defaults = {"r": 4, "alpha": 8.0, "dropout": 0.1}
    path = dump_rules(EVERY_FIELD, tmp_path / f"rules{suffix}", defaults=defaults)
    rules, loaded_defaults = load_rules(path)
    assert loaded_defaults == defaults
    assert [r.to_dict() for r in rules] == [r.to_dict() for r in EVERY_FIELD]
    assert rules[:3] == EVERY_FIELD[:3]  # equal as Rules too (classes are written by name)
    assert rules[3].module_type == ("Proj", "Conv1D")
    again = dump_rules(rules, tmp_path / f"again{suffix}", defaults=loaded_defaults)
    assert again.read_text() == path.read_text()


def test_toml_is_written_as_rule_tables(tmp_path):
    text = dumps_toml(EVERY_FIELD[:2], {"r": 4})
    assert text.startswith("[defaults]\nr = 4\n\n[[rule]]\nname = \"lm_head\"\nexclude = true\n")
    assert tomllib.loads(text)["rule"][1]["layers"] == "0:2"  # a span stays a span (never expanded)
    data = json.loads(dump_rules(EVERY_FIELD[:1], tmp_path / "r.json").read_text())
    assert data == {"rules": [{"name": "lm_head", "exclude": True}]}


def test_a_hand_written_toml_file_drives_plan(tmp_path, model):
    path = tmp_path / "lora.toml"
    path.write_text('''
[defaults]
r = 4
alpha = 8

[[rule]]
name = "head"
exclude = true

[[rule]]
op = "conv1d"
layers = "0:2"
r = 2

[[rule]]
module_type = ["Linear", "Proj"]
''')
    rules, defaults = load_rules(path)
    assert chosen(model, rules, via_plan=True, **defaults) == {"layers.0.up": 2, "layers.1.up": 2,
                                                **{f"layers.{i}.{n}": 4 for i in range(3) for n in "qv"}}


@pytest.mark.parametrize("filename, text, words", [
    ("bad.toml", "[[rule]]\nname = q\n", ["not valid TOML", "line 2"]),
    ("bad.json", '{"rules": [{"name": "q",}]}', ["not valid JSON", "line 1"]),
    ("r.toml", "[[rule]]\nname = 'q'\n[[rule]]\nname = 'v'\nr = 0\n", ["rule 1", "r must be a positive integer"]),
    ("r.toml", "[[rule]]\nname = 'q'\nrank = 4\n", ["rule 0", "unknown field(s) ['rank']"]),
    ("r.json", '{"rules": [{"name": "q"}, {"layers": "x"}]}', ["rule 1", "layers must be ints"]),
    ("r.toml", "[rule]\nname = 'q'\n", ["must be a list of tables", "[[rule]]"]),
    ("r.toml", "[[rules]]\nname = 'q'\n[defaults]\nr = -1\n", ["[defaults]", "r must be a positive integer"]),
    ("r.toml", "[defaults]\nr = 4\nscaling = 'rslora'\n[[rule]]\nname = 'q'\n", ["unknown default(s) ['scaling']"]),
    ("r.toml", "[defaults]\nr = 4\n", ["no rules"]),
    ("r.json", '{"rules": [], "extra": 1}', ["unknown top-level key(s) ['extra']"]),
    ("r.json", '{"rules": []}', ["the rule list is empty"]),
    ("r.yaml", "rules: []", ["unknown rules file type '.yaml'", "*.toml or *.json"]),
])
def test_malformed_rules_files(tmp_path, filename, text, words):
    path = tmp_path / filename
    path.write_text(text)
    with pytest.raises(RuleError) as info:
        load_rules(path)
    message = str(info.value)
    for word in words:
        assert word in message
    assert filename in message or filename.endswith(".yaml")


def test_missing_file_and_unknown_suffix_on_write(tmp_path):
    with pytest.raises(RuleError, match="not found"):
        load_rules(tmp_path / "nope.toml")
    with pytest.raises(RuleError, match="unknown rules file type"):
        dump_rules([Rule(name="q")], tmp_path / "rules.yml")
    with pytest.raises(RuleError, match="unknown default"):
        dump_rules([Rule(name="q")], tmp_path / "rules.toml", defaults={"rank": 2})
