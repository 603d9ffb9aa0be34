"""A refused call leaves the user's model as it was: values, requires_grad, modules, train/eval mode.

adapt freezes the model's own parameters (the adapted graph shares them) and the loaders check a file only after
adapting, so each refusal path below would leave a frozen model behind without lora_fx.rollback.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import safetensors.torch
import torch

import lora_fx
from lora_fx import AdapterFileError, Rule

import zoo as Z
from bad_inputs import assert_unchanged, state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def gpt2(layers: int = 2, width: int = 32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=2, vocab_size=100, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, use_cache=False)
    return transformers.GPT2LMHeadModel(cfg).train()  # train mode: a refused call must not switch it


IDS = (torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0)),)


def peft_folder(tmp_path, model, target_modules=("c_attn",)):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8,
                                                                       target_modules=list(target_modules)))
        pm.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def refused(model, call, *words):
    """`call` raises an AdapterFileError naming `words`; the model is exactly as before."""
    before = state(model)
    with pytest.raises(AdapterFileError) as info:
        call()
    for word in words:
        assert word in str(info.value), str(info.value)
    assert_unchanged(model, before)


def test_load_peft_adapter_from_a_deeper_model(tmp_path):
    folder = peft_folder(tmp_path, gpt2(layers=3))
    model = gpt2(layers=2)
    refused(model, lambda: lora_fx.load_peft_adapter(model, folder, example_inputs=IDS), "h.2.attn.c_attn")


def test_load_peft_adapter_with_a_module_the_base_lacks(tmp_path):
    folder = peft_folder(tmp_path, gpt2())
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))
    renamed = {k.replace("h.1.attn.c_attn", "h.1.attn.c_nope"): v for k, v in tensors.items()}
    safetensors.torch.save_file(renamed, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config["target_modules"] = ["c_attn", "c_nope"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model = gpt2()
    refused(model, lambda: lora_fx.load_peft_adapter(model, folder, example_inputs=IDS), "c_nope")


def test_load_peft_adapter_with_a_wrong_shape_tensor(tmp_path):
    folder = peft_folder(tmp_path, gpt2(width=32))
    model = gpt2(width=48)
    refused(model, lambda: lora_fx.load_peft_adapter(model, folder, example_inputs=IDS), "shape")


def _saved(tmp_path, model, rules=(Rule(name="c_attn", r=4),)):
    adapted = lora_fx.adapt(copy.deepcopy(model), list(rules), example_inputs=IDS)
    return lora_fx.save_adapter(adapted, tmp_path / "adapter")


def test_adapt_from_adapter_of_a_deeper_model(tmp_path):
    folder = _saved(tmp_path, gpt2(layers=3))
    model = gpt2(layers=2)
    refused(model, lambda: lora_fx.adapt_from_adapter(model, folder, example_inputs=IDS), "h.2.attn.c_attn")


def test_adapt_from_adapter_with_other_widths(tmp_path):
    folder = _saved(tmp_path, gpt2(width=32))
    model = gpt2(width=48)
    refused(model, lambda: lora_fx.adapt_from_adapter(model, folder, example_inputs=IDS), "shape")


def test_load_adapter_into_an_adapted_model_leaves_its_lora_as_it_was(tmp_path):
    folder = _saved(tmp_path, gpt2(width=32))
    adapted = lora_fx.adapt(gpt2(width=48), [Rule(name="c_attn", r=4)], example_inputs=IDS)
    refused(adapted, lambda: lora_fx.load_adapter(adapted, folder), "shape")


def test_adapt_refused_by_a_rule_leaves_the_model(tmp_path):
    model, args, kwargs = Z.narrow_head()
    model.train()
    before = state(model)
    with pytest.raises(lora_fx.RuleError):
        lora_fx.adapt(model, [Rule(name="head", r=16)], example_inputs=args, strict=True)
    assert_unchanged(model, before)
