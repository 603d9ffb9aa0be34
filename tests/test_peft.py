"""PEFT compatibility both ways, on tiny random transformers models (no download).

Tolerances, and why:
* adapted vs PEFT (unmerged): lora_fx's branch computes scale · B(A(x)) with the same fp32 ops as PEFT's lora.Linear
  and adds it to the same base op's output: bitwise equal on this CPU (max |diff| = 0.0 measured). ATOL = 1e-5 only
  leaves room for a BLAS that picks another kernel (fp32 rounding, ~1e-7 relative, over widths <= 128).
* folded vs merge_and_unload: lora_fx's fold sums W0 + scale · B @ A in fp64 and rounds once; PEFT rounds B @ A, the
  scaling and the sum in fp32. The weights differ by at most a couple of ulps (<= 1e-6 measured, checked against
  ATOL), which two layers carry to the logits as ~3e-6 (measured): ATOL_MERGED = 5e-5.
* Every LoRA delta here moves the logits by more than MIN_DELTA = 0.1, so a wrong scale, transpose, rank or module
  fails by orders of magnitude.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import lora_fx  # noqa: E402
from lora_fx.errors import AdapterFileError  # noqa: E402
from lora_fx.peft_compat import load_peft_adapter, save_peft_adapter  # noqa: E402

ATOL = 1e-5
ATOL_MERGED = 5e-5
MIN_DELTA = 0.1
transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


def gpt2(width: int = 32):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=width, n_head=2, vocab_size=100, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                        max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=0)).eval()


MODELS = {"gpt2": gpt2, "llama": llama}
IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(3))
KW = {"use_cache": False}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, **KW).logits


def export_adapt_kwargs() -> dict:
    return dict(example_inputs=(IDS,), example_kwargs=KW, frontend="export")


def randomize_peft(peft_model, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def peft_saved(tmp_path, make, config: LoraConfig):
    base = make()
    pristine = copy.deepcopy(base)  # get_peft_model changes `base` in place
    pm = get_peft_model(base, config).eval()  # PEFT's new lora_dropout modules start in training mode
    randomize_peft(pm)
    pm.save_pretrained(str(tmp_path / "peft"))
    return pm, pristine


PEFT_CONFIGS = {
    # GPT-2: Conv1D weights stored (in, out) -> fan_in_fan_out; per-module rank and alpha
    "gpt2": LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                       rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"mlp.c_proj": 3}),
    # Llama: nn.Linear; rsLoRA scaling alpha/sqrt(r), a rank pattern, dropout (off in eval)
    "llama": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                        rank_pattern={"layers.0.self_attn.q_proj": 2}, lora_dropout=0.1),
}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_load_peft_adapter_matches_peft_and_merge_and_unload(tmp_path, name):
    pm, pristine = peft_saved(tmp_path, MODELS[name], PEFT_CONFIGS[name])
    base_out = logits(pristine)
    adapted = load_peft_adapter(pristine, tmp_path / "peft", **export_adapt_kwargs())

    loras = {l.weight_name: l for l in adapted.lora_fx.values()}
    if name == "gpt2":
        assert len(loras) == 6
        l = loras["transformer.h.1.attn.c_attn.weight"]
        assert (l.r, l.alpha, l.weight_layout) == (2, 8.0, "in_out")
        assert (loras["transformer.h.0.mlp.c_proj.weight"].r, loras["transformer.h.0.mlp.c_proj.weight"].alpha) == (4, 3.0)
    else:
        assert len(loras) == 6
        l = loras["model.layers.0.self_attn.q_proj.weight"]
        assert (l.r, l.scaling_kind, l.scaling) == (2, "rslora", pytest.approx(8 / 2 ** 0.5))

    peft_out, ours = logits(pm), logits(adapted)
    assert (peft_out - base_out).abs().max() > MIN_DELTA  # the adapter really changes the output
    diff = (ours - peft_out).abs().max().item()
    assert diff <= ATOL, f"lora_fx vs PEFT: max |diff| {diff}"

    folded = lora_fx.fold(adapted)
    merged = pm.merge_and_unload()
    diff = (logits(folded) - logits(merged)).abs().max().item()
    assert diff <= ATOL_MERGED, f"fold vs merge_and_unload: max |diff| {diff}"
    merged_sd, folded_sd = merged.state_dict(), folded.state_dict()
    for w in loras:
        assert torch.allclose(folded_sd[w], merged_sd[w], rtol=0, atol=ATOL), w


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_save_peft_adapter_loads_in_peft_with_same_outputs(tmp_path, name):
    model = MODELS[name]()
    pristine = copy.deepcopy(model)
    rules = {
        # layer 0: LoRA on the q and v rows of the fused c_attn only (loralib's MergedLinear), rsLoRA
        "gpt2": [lora_fx.Rule(name="h.0.attn.c_attn", role=["attn.q", "attn.v"], r=2, alpha=4, scaling="rslora"),
                 lora_fx.Rule(name="h.0.attn.c_attn", exclude=True),  # its k rows: slices decide one by one
                 lora_fx.Rule(name="c_attn|c_proj", r=4, alpha=8)],
        "llama": [lora_fx.Rule(name="q_proj", r=4, alpha=16, scaling="rslora"),
                  lora_fx.Rule(name="layers.1.mlp.down_proj", r=2, alpha=8, scaling="rslora")],
    }[name]
    adapted = lora_fx.adapt(model, rules, **export_adapt_kwargs())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g) * 0.5)
    directory = save_peft_adapter(adapted, tmp_path / "peft", base_model_name_or_path="tiny-random")

    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny-random"
    if name == "gpt2":
        assert sorted(l.rows for l in adapted.lora_fx.values() if l.rows) == [((0, 32),), ((64, 96),)]
        # the q and v slices become one rank-4 LoRA on c_attn whose B is zero on the k rows, with scale 1
        assert config["use_rslora"] is False and config["fan_in_fan_out"] is True
        assert config["r"] == 4 and config["lora_alpha"] == 8 and config["alpha_pattern"] == {
            r"^transformer\.h\.0\.attn\.c_attn": 4}
        from safetensors.torch import load_file
        b = load_file(str(directory / "adapter_model.safetensors"))[
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
        assert b.shape == (96, 4) and not b[32:64].any() and b[:32, :2].any() and not b[:32, 2:].any()
    else:  # all rsLoRA
        assert config["use_rslora"] is True

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(pristine, str(directory))
    n_peft = sum(1 for n, _ in pm.named_parameters() if n.endswith("lora_A.default.weight"))
    assert n_peft == len({l.weight_name for l in adapted.lora_fx.values()})  # one PEFT LoRA per module
    ours, peft_out = logits(adapted), logits(pm)
    with pm.disable_adapter():
        assert (peft_out - logits(pm)).abs().max() > MIN_DELTA
    diff = (ours - peft_out).abs().max().item()
    assert diff <= ATOL, f"PEFT vs lora_fx: max |diff| {diff}"
    diff = (logits(pm.merge_and_unload()) - logits(lora_fx.fold(adapted))).abs().max().item()
    assert diff <= ATOL_MERGED, f"merge_and_unload vs fold: max |diff| {diff}"


class Tiny(torch.nn.Module):
    """A plain (non-transformers) model: PEFT adapts its nn.Linear layers, lora_fx traces it symbolically."""

    def __init__(self, d: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"q": torch.nn.Linear(d, d), "v": torch.nn.Linear(d, d)}) for _ in range(2))
        self.out = torch.nn.Linear(d, 4)

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.tanh(b["q"](x)) * b["v"](x)
        return self.out(x)


def test_round_trip_through_peft_format(tmp_path):
    """lora_fx -> PEFT files -> lora_fx gives back the same modules, settings and outputs; PEFT agrees too."""
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    rules = [lora_fx.Rule(name="blocks.1.q", r=2, alpha=5), lora_fx.Rule(name="q|out", r=4, alpha=8),
             lora_fx.Rule(name="v", r=3, alpha=3, scaling="rslora")]
    adapted = lora_fx.adapt(Tiny().eval(), rules, example_inputs=(x,))
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_B.normal_()
    save_peft_adapter(adapted, tmp_path / "p")
    back = load_peft_adapter(Tiny().eval(), tmp_path / "p", example_inputs=(x,))
    assert {k: (l.r, l.scaling) for k, l in back.lora_fx.items()} == \
           {k: (l.r, pytest.approx(l.scaling)) for k, l in adapted.lora_fx.items()}
    assert len(back.lora_fx) == 5  # q (r=2 in block 1, r=4 in block 0), v (rsLoRA) twice, out
    assert torch.allclose(back(x), adapted(x), rtol=0, atol=ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(Tiny().eval(), str(tmp_path / "p")).eval()
    with torch.no_grad():
        assert (pm(x) - Tiny()(x)).abs().max() > MIN_DELTA
        assert torch.allclose(pm(x), adapted(x), rtol=0, atol=ATOL)


def test_falcon_linears_x_at_w_transposed_go_to_peft_as_linear_modules(tmp_path):
    """Falcon's FalconLinear (an nn.Linear subclass computing x @ W.T) is a Linear to PEFT: the adapter names the
    modules (target_modules, not target_parameters), PEFT computes what lora_fx does, and it loads back."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=50,
                                       use_cache=False)
    base = transformers.FalconForCausalLM(config).eval()
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    adapted = lora_fx.adapt(copy.deepcopy(base), example_inputs=(ids,))
    assert len(adapted.lora_fx) == 4  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h (x @ W.T each)
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_B.normal_(0, 0.1)
    save_peft_adapter(adapted, tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert "dense_4h_to_h" in config["target_modules"] and not config["target_parameters"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p")).eval()
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        assert (want - base(input_ids=ids).logits).abs().max() > MIN_DELTA
        assert torch.allclose(pm(input_ids=ids).logits, want, rtol=0, atol=ATOL)
        back = load_peft_adapter(copy.deepcopy(base), tmp_path / "p", example_inputs=(ids,))
        assert torch.allclose(back(input_ids=ids).logits, want, rtol=0, atol=ATOL)


def test_refuses_dora_and_other_variants(tmp_path):
    pm, pristine = peft_saved(tmp_path, gpt2, LoraConfig(r=2, target_modules=["c_attn"], use_dora=True,
                                                         fan_in_fan_out=True))
    with pytest.raises(AdapterFileError, match="use_dora=True .*DoRA"):
        load_peft_adapter(pristine, tmp_path / "peft", **export_adapt_kwargs())
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config.update(use_dora=False, init_lora_weights="pissa")
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="init_lora_weights='pissa'"):
        load_peft_adapter(pristine, tmp_path / "peft", **export_adapt_kwargs())
    config.update(init_lora_weights=True)  # DoRA's magnitude vectors are still in the tensors
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="lora_magnitude_vector"):
        load_peft_adapter(pristine, tmp_path / "peft", **export_adapt_kwargs())


def test_peft_adapter_for_other_widths_is_refused(tmp_path):
    pm, _ = peft_saved(tmp_path, Tiny, LoraConfig(r=4, target_modules=["q"]))
    with pytest.raises(AdapterFileError, match=r"lora_A: shape \(r, in\) expected \(4, 24\), found \(4, 16\)"):
        load_peft_adapter(Tiny(24), tmp_path / "peft", example_inputs=(torch.randn(2, 24),))
    pm, _ = peft_saved(tmp_path / "o", Tiny, LoraConfig(r=4, target_modules=["q"]))
    with pytest.raises(AdapterFileError, match=r"no linear-like site for any|does not fit"):
        load_peft_adapter(gpt2(), tmp_path / "o" / "peft", **export_adapt_kwargs())


def test_save_peft_refuses_sites_peft_cannot_hold(tmp_path):
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return x @ self.w

    adapted = lora_fx.adapt(Bare(), None, r=2, example_inputs=(torch.randn(2, 8),))
    with pytest.raises(AdapterFileError, match="no PEFT equivalent"):
        save_peft_adapter(adapted, tmp_path / "p")
    assert not (tmp_path / "p").exists()


# ------------------------------------------------------------------------------------------------ untrusted PEFT folders
# An adapter folder comes from someone else: every value lora_fx reads is checked, its regexes match in bounded
# time, and its tensors must be the modules its config targets.
SLOW = r"(?:[a-z_.0-9]|[a-z_.0-9])*[A-Z]"  # backtracks exponentially in re and in the regex package


class LongNames(torch.nn.Module):
    """A module name long enough (40 characters) for a backtracking regex to run for years."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.projection_of_the_input_to_hidden_units = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.projection_of_the_input_to_hidden_units(x)))


X16 = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_peft(tmp_path_factory):
    """A PEFT folder of Tiny (LoRA on every q and v), written by PEFT itself."""
    d = tmp_path_factory.mktemp("tiny_peft")
    peft_saved(d, Tiny, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    return d / "peft"


def edited(source, tmp_path, **changes):
    """A copy of a PEFT folder with its adapter_config.json changed."""
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(source, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def refused(model, folder, *words, example_inputs=(X16,)) -> str:
    from conftest import deadline

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with deadline(30), pytest.raises(AdapterFileError) as info:
        load_peft_adapter(model, folder, example_inputs=example_inputs)
    message = str(info.value)
    assert "How to fix:" in message and str(folder) in message, message  # the folder, or its adapter_config.json
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    return message


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern", "target_modules", "exclude_modules"])
def test_a_peft_regex_that_backtracks_is_refused_in_bounded_time(tmp_path, field):
    peft_saved(tmp_path, LongNames, LoraConfig(r=4, target_modules=["projection_of_the_input_to_hidden_units"]))
    folder = edited(tmp_path / "peft", tmp_path, **{field: {SLOW: 4} if field.endswith("pattern") else SLOW})
    refused(LongNames(), folder, field, "backtracks", "adapter_config.json")


def test_the_issue_pattern_finishes_and_means_what_it_means_in_peft(tmp_path):
    """(.|.)*Z doubles re's time per character: on this 40-character name re would run for days. It matches no
    module, so the file's r applies, as in PEFT."""
    from conftest import deadline

    peft_saved(tmp_path, LongNames, LoraConfig(r=4, target_modules=["projection_of_the_input_to_hidden_units"]))
    folder = edited(tmp_path / "peft", tmp_path, rank_pattern={"(.|.)*Z": 2})
    with deadline(30):
        adapted = load_peft_adapter(LongNames(), folder, example_inputs=(X16,))
    assert [l.r for l in adapted.lora_fx.values()] == [4]


@pytest.mark.parametrize("changes, words", [
    ({"lora_dropout": "abc"}, ["lora_dropout='abc' is not a number in [0, 1)"]),
    ({"lora_dropout": -0.1}, ["lora_dropout=-0.1"]),
    ({"lora_dropout": float("nan")}, ["lora_dropout=nan"]),
    ({"use_rslora": "false"}, ["use_rslora='false' is not true or false"]),
    ({"rank_pattern": {"(": 2}}, ["rank_pattern key '('", "not a valid regex"]),
    ({"rank_pattern": ["q"]}, ["rank_pattern=['q']"]),
    ({"rank_pattern": {"q": 2.5}}, ["rank_pattern['q']=2.5"]),
    ({"alpha_pattern": {"q": "8"}}, ["alpha_pattern['q']='8'"]),
    ({"lora_alpha": float("inf")}, ["lora_alpha=inf"]),
    ({"r": "4"}, ["r='4' is not a positive integer"]),
    ({"target_modules": 3}, ["target_modules=3"]),
    ({"target_modules": "q|("}, ["target_modules is not a valid regex"]),
    ({"layers_to_transform": "1"}, ["layers_to_transform='1'"]),
    ({"use_newvariant": True}, ["fields lora_fx does not know", "use_newvariant"]),
    ({"velora_config": {"rank": 2}}, ["VeLoRA"]),
    ({"init_lora_weights": "mica"}, ["init_lora_weights='mica'"]),
])
def test_malformed_peft_config_values(tiny_peft, tmp_path, changes, words):
    refused(Tiny().eval(), edited(tiny_peft, tmp_path, **changes), *words)


@pytest.mark.parametrize("changes", [{"use_rslora": None, "lora_dropout": None}, {"lora_dropout": 0},
                                     {"runtime_config": {"ephemeral_gpu_offload": False}}])
def test_plain_peft_values_still_load(tiny_peft, tmp_path, changes):
    adapted = load_peft_adapter(Tiny().eval(), edited(tiny_peft, tmp_path, **changes), example_inputs=(X16,))
    assert len(adapted.lora_fx) == 4


def test_layers_to_transform_is_honoured_and_checked_against_the_tensors(tmp_path):
    """PEFT adapts only the layers its config names. A consistent folder loads as PEFT loads it; a folder whose
    tensors cover layers its config excludes is refused (loading all of it gave logits off by the extra LoRA)."""
    one = LoraConfig(r=4, lora_alpha=8, target_modules=["q"], layers_to_transform=[1], layers_pattern="blocks")
    pm, _ = peft_saved(tmp_path / "one", Tiny, one)
    adapted = load_peft_adapter(Tiny().eval(), tmp_path / "one" / "peft", example_inputs=(X16,))
    assert [l.weight_name for l in adapted.lora_fx.values()] == ["blocks.1.q.weight"]
    with torch.no_grad():
        assert torch.allclose(adapted(X16), pm(X16), rtol=0, atol=ATOL)

    peft_saved(tmp_path / "all", Tiny, LoraConfig(r=4, lora_alpha=8, target_modules=["q"]))
    folder = edited(tmp_path / "all" / "peft", tmp_path, layers_to_transform=[1], layers_pattern="blocks")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(Tiny().eval(), str(folder))
    adapted_by_peft = sorted(n.removesuffix(".lora_A.default.weight").removeprefix("base_model.model.")
                             for n, _ in peft_model.named_parameters() if n.endswith("lora_A.default.weight"))
    assert adapted_by_peft == ["blocks.1.q"]  # what PEFT does with this folder
    refused(Tiny().eval(), folder, "blocks.0.q", "it is in layer 0, and layers_to_transform=[1]")


@pytest.mark.parametrize("changes, words", [
    ({"target_modules": ["v"]}, ["blocks.0.q", "does not name it"]),
    ({"target_modules": r"blocks\.1\.q"}, ["blocks.0.q", "does not match it"]),
    ({"exclude_modules": ["blocks.0.q"]}, ["blocks.0.q", "exclude_modules lists it"]),
    ({"exclude_modules": r".*0\.q"}, ["blocks.0.q", "excludes it"]),
])
def test_tensors_for_modules_the_config_does_not_target_are_refused(tmp_path, changes, words):
    peft_saved(tmp_path, Tiny, LoraConfig(r=4, lora_alpha=8, target_modules=["q"]))
    refused(Tiny().eval(), edited(tmp_path / "peft", tmp_path, **changes), *words)


def test_the_first_matching_pattern_key_wins_as_in_peft(tmp_path):
    """PEFT takes the first alpha_pattern key that matches a module, in the order of the file it loads (its
    save_pretrained sorts the keys, so that is not always the order it trained with): both orders, against
    PeftModel.from_pretrained on the same file."""
    peft_saved(tmp_path, Tiny, LoraConfig(r=4, lora_alpha=8, target_modules=["q"],
                                          alpha_pattern={"q": 2, r"blocks\.1\.q": 32}))
    for order, expected in (([r"blocks\.1\.q", "q"], [0.5, 8.0]), (["q", r"blocks\.1\.q"], [0.5, 0.5])):
        values = {"q": 2, r"blocks\.1\.q": 32}
        folder = edited(tmp_path / "peft", tmp_path / order[0].replace("\\", ""),
                        alpha_pattern={k: values[k] for k in order})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = PeftModel.from_pretrained(Tiny().eval(), str(folder)).eval()
        peft_scalings = [pm.base_model.model.blocks[i]["q"].scaling["default"] for i in range(2)]
        adapted = load_peft_adapter(Tiny().eval(), folder, example_inputs=(X16,))
        ours = [adapted.lora_fx[k].scaling for k in sorted(adapted.lora_fx)]
        assert ours == peft_scalings == expected
        with torch.no_grad():
            assert torch.allclose(adapted(X16), pm(X16), rtol=0, atol=ATOL)


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_embedding_and_head_loras_load_from_peft_default_saves(tmp_path, target):
    """PEFT's save_pretrained stores an adapted embedding's or output layer's base weight beside its LoRA by default
    (save_embedding_layers="auto"): checked equal to the model's own and left out (the load was refused); a file
    whose base weight differs from the model's (a resized vocabulary) is refused, naming it."""
    pm, pristine = peft_saved(tmp_path, llama, LoraConfig(r=4, lora_alpha=8, target_modules=[target]))
    adapted = load_peft_adapter(pristine, tmp_path / "peft", **export_adapt_kwargs())
    torch.testing.assert_close(logits(adapted), logits(pm), atol=ATOL, rtol=0)
    other = llama()
    with torch.no_grad():
        getattr(other.model if target == "embed_tokens" else other, target).weight.add_(1.0)
    with pytest.raises(AdapterFileError, match="stores the base weight of .* differs from this model's"):
        load_peft_adapter(other, tmp_path / "peft", **export_adapt_kwargs())


@pytest.mark.parametrize("saved", [["layers.1.mlp"], ["norm"]])
def test_modules_to_save_naming_a_parent_or_a_suffix_load_as_in_peft(tmp_path, saved):
    """PEFT trains in full every module whose path ends with an entry, and saves the parameters of its submodules:
    a parent module (an MLP block) and a plain suffix ("norm": every layernorm) load with PEFT's outputs."""
    pm, pristine = peft_saved(tmp_path, llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                          modules_to_save=saved))
    with torch.no_grad():  # as if trained
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)
    pm.save_pretrained(str(tmp_path / "peft"))
    adapted = load_peft_adapter(pristine, tmp_path / "peft", **export_adapt_kwargs())
    torch.testing.assert_close(logits(adapted), logits(pm), atol=ATOL, rtol=0)
    assert not torch.allclose(logits(adapted), logits(pristine), atol=1e-3)


def test_a_lora_on_a_tied_weight_is_refused_with_the_untie_that_loads_it(tmp_path):
    """An lm_head tied to the embedding: the refusal says so and how to untie (it said "no rule matched" or "load it
    onto the model it was trained on"); untied as it says, the adapter loads with PEFT's outputs."""
    def tied_llama():
        model = llama()
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
        return model

    pm, pristine = peft_saved(tmp_path, tied_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
    with pytest.raises(AdapterFileError, match="shares with .*embed_tokens") as info:
        load_peft_adapter(pristine, tmp_path / "peft", **export_adapt_kwargs())
    assert "model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())" in str(info.value)
    pristine.lm_head.weight = torch.nn.Parameter(pristine.lm_head.weight.detach().clone())  # as the message says
    pristine.config.tie_word_embeddings = False
    adapted = load_peft_adapter(pristine, tmp_path / "peft", **export_adapt_kwargs())
    torch.testing.assert_close(logits(adapted), logits(pm), atol=ATOL, rtol=0)
