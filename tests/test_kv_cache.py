"""Decoder LMs deployed with a KV cache (issue 17), on CPU with real torch, ONNX and ONNX Runtime:
export_onnx(kv_cache=True) of base, merged and unmerged models (names, dynamic sizes, base == merged), generate_onnx
tokens equal to transformers' generate on the merged PyTorch model for five families (batch 2, left padding),
sampling, deployment dtypes, and the errors."""

from __future__ import annotations

import copy

import onnx
import onnxruntime as ort
import pytest
import torch

import lora_fx

transformers = pytest.importorskip("transformers")

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def family(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    elif name == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL))
    elif name == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **SMALL))
    elif name == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **SMALL))
    elif name == "phi3":
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**SMALL))
    else:
        raise ValueError(name)
    return model.eval()


def adapted_and_merged(model: torch.nn.Module, rules=None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model adapted (q,v or the given rules) with trained-looking B, and its fold (the user's class)."""
    rules = rules or [lora_fx.Rule(name="q_proj|v_proj|qkv_proj", r=4, alpha=8)]
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    adapted = lora_fx.adapt(copy.deepcopy(model), rules, example_inputs=(ids,), example_kwargs={"use_cache": False})
    torch.manual_seed(1)
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_B.normal_(0, 0.5)
    return adapted, lora_fx.fold(adapted)


def left_padded(batch: int = 2, seq: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    return ids, mask


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("kv_llama")
    base = family("llama")
    adapted, merged = adapted_and_merged(base)
    for name, model in (("base", base), ("merged", merged), ("unmerged", adapted)):
        lora_fx.export_onnx(model, d / f"{name}.onnx", kv_cache=True)
    return d, base, adapted, merged


# ------------------------------------------------------------------------------------------------ the file
def test_cache_file_is_named_as_optimum_and_genai_name_theirs(llama_files):
    d, *_ = llama_files
    graph = onnx.load(str(d / "merged.onnx")).graph
    dims = lambda v: [x.dim_param or x.dim_value for x in v.type.tensor_type.shape.dim]  # noqa: E731
    inputs = {v.name: dims(v) for v in graph.input}
    outputs = {v.name: dims(v) for v in graph.output}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["input_ids"] == ["batch", "sequence"] and inputs["attention_mask"] == ["batch", "total_sequence"]
    assert [n for n in inputs if n.startswith("past")] == [f"past_key_values.{i}.{p}" for i in range(2)
                                                          for p in ("key", "value")]
    assert inputs["past_key_values.1.value"] == ["batch", 2, "past_sequence", 8]
    assert list(outputs) == ["logits"] + [f"present.{i}.{p}" for i in range(2) for p in ("key", "value")]
    assert outputs["logits"] == ["batch", "sequence", VOCAB]
    assert set(outputs["present.0.key"][2].replace(" ", "").split("+")) == {"past_sequence", "sequence"}


def test_merged_cache_file_is_identical_to_the_base_and_so_is_the_onnx_fold_of_the_unmerged(llama_files, tmp_path):
    d, *_ = llama_files
    report = lora_fx.verify_onnx(d / "base.onnx", d / "merged.onnx")
    assert report.identical, str(report)
    fold = lora_fx.fold_onnx(d / "unmerged.onnx", tmp_path / "folded.onnx")
    assert fold.ok and fold.folded == 4, str(fold)
    assert lora_fx.verify_onnx(d / "base.onnx", tmp_path / "folded.onnx").identical


def test_one_file_serves_prefill_and_steps_at_any_batch_like_the_torch_model(llama_files):
    """Prefill (empty past) then a 2-token step, batch 3: logits and cache equal the merged model's with its own
    DynamicCache; the unmerged file gives the same numbers."""
    import numpy as np

    d, _, adapted, merged = llama_files
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    more = torch.randint(3, VOCAB, (3, 2), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = merged(input_ids=ids, use_cache=True)
        second = merged(input_ids=more, past_key_values=first.past_key_values, use_cache=True)
    for name in ("merged", "unmerged"):
        session = ort.InferenceSession(str(d / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        empty = np.zeros((3, 2, 0, 8), np.float32)
        feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((3, 5), np.int64),
                "position_ids": np.arange(5)[None].repeat(3, 0)}
        out = session.run(None, {**feed, **{f"past_key_values.{i}.{p}": empty for i in range(2)
                                            for p in ("key", "value")}})
        feed = {"input_ids": more.numpy(), "attention_mask": np.ones((3, 7), np.int64),
                "position_ids": np.arange(5, 7)[None].repeat(3, 0)}
        out = session.run(None, {**feed, **dict(zip([f"past_key_values.{i}.{p}" for i in range(2)
                                                     for p in ("key", "value")], out[1:]))})
        np.testing.assert_allclose(out[0], second.logits.numpy(), atol=1e-4, rtol=1e-4)
        assert out[1].shape == (3, 2, 7, 8)


# ------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mistral", "phi3"])
def test_generated_tokens_equal_transformers_generate_on_the_merged_model(name, tmp_path):
    base = family(name)
    _, merged = adapted_and_merged(base)
    lora_fx.export_onnx(merged, tmp_path / "merged.onnx", kv_cache=True)
    ids, mask = left_padded()
    want = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = lora_fx.generate_onnx(tmp_path / "merged.onnx", ids, mask, max_new_tokens=8, device="cpu")
    assert torch.equal(got, want), (got, want)
    plain = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert not torch.equal(got, plain)  # the adapter changes what is generated: equality above is not vacuous
    single = lora_fx.generate_onnx(tmp_path / "merged.onnx", ids[1:], max_new_tokens=8, device="cpu")
    assert torch.equal(single, want[1:])  # the unpadded row alone, no mask given


def test_sampling_is_reproducible_and_top_k_1_is_greedy(llama_files):
    d, *_ = llama_files
    ids, mask = left_padded()
    path = d / "merged.onnx"
    draw = lambda seed, **kw: lora_fx.generate_onnx(path, ids, mask, max_new_tokens=6, do_sample=True,  # noqa: E731
                                                    generator=torch.Generator().manual_seed(seed), device="cpu", **kw)
    assert torch.equal(draw(1, temperature=1.5), draw(1, temperature=1.5))
    assert not torch.equal(draw(1, temperature=5.0), draw(2, temperature=5.0))
    greedy = lora_fx.generate_onnx(path, ids, mask, max_new_tokens=6, device="cpu")
    assert torch.equal(draw(3, top_k=1), greedy) and torch.equal(draw(4, top_p=1e-6), greedy)


def test_eos_stops_a_row_and_pads_it_as_generate_does(llama_files):
    d, _, _, merged = llama_files
    ids, mask = left_padded()
    greedy = lora_fx.generate_onnx(d / "merged.onnx", ids, mask, max_new_tokens=6, device="cpu")
    for eos in {int(greedy[0, 8]), int(greedy[1, 9])}:  # tokens the rows produce: they stop there
        want = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               eos_token_id=eos, pad_token_id=0)
        got = lora_fx.generate_onnx(d / "merged.onnx", ids, mask, max_new_tokens=6, eos_token_id=eos,
                                    pad_token_id=0, device="cpu")
        assert torch.equal(got, want), (eos, got, want)
        assert got.shape[1] < greedy.shape[1] or (got == 0).any()


def test_the_file_stops_at_the_models_own_eos_as_generate_does(tmp_path):
    """export_onnx(kv_cache=True) writes the model's generation_config eos/pad ids into the file, so generate_onnx
    without eos_token_id stops where model.generate (which reads that config) stops; eos_token_id=[] never stops."""
    base = family("llama")
    _, merged = adapted_and_merged(base)
    ids, mask = left_padded()
    free = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    merged.generation_config.eos_token_id = int(free[1, 9])  # a token row 1 produces: generate stops that row there
    merged.generation_config.pad_token_id = 3
    path = lora_fx.export_onnx(merged, tmp_path / "merged.onnx", kv_cache=True)
    want = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert not torch.equal(want, free)  # the config's eos changes what generate returns: the check is not vacuous
    got = lora_fx.generate_onnx(path, ids, mask, max_new_tokens=6, device="cpu")
    assert torch.equal(got, want), (got, want)
    assert torch.equal(lora_fx.generate_onnx(path, ids, mask, max_new_tokens=6, eos_token_id=[], device="cpu"), free)


def test_generate_errors_say_what_where_and_how(llama_files, tmp_path):
    d, base, *_ = llama_files
    ids = torch.tensor([[5, 6, 7]])
    lora_fx.export_onnx(base, tmp_path / "plain.onnx", (ids,), {"use_cache": False})
    with pytest.raises(lora_fx.InputError, match="not a decoder with a KV cache") as err:
        lora_fx.generate_onnx(tmp_path / "plain.onnx", ids, device="cpu")
    assert "kv_cache=True" in err.value.fix
    with pytest.raises(lora_fx.InputError, match=r"token ids must lie in \[0, 96\)"):
        lora_fx.generate_onnx(d / "merged.onnx", torch.tensor([[5, 500]]), device="cpu")
    with pytest.raises(lora_fx.InputError, match="attention_mask must be"):
        lora_fx.generate_onnx(d / "merged.onnx", ids, torch.ones(1, 2), device="cpu")
    with pytest.raises(lora_fx.InputError, match="needs a pad_token_id"):
        lora_fx.generate_onnx(d / "merged.onnx", ids, eos_token_id=2, device="cpu")


def test_kv_cache_export_of_a_model_without_a_cache_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    with pytest.raises(lora_fx.InputError, match="kv_cache=True") as err:
        lora_fx.export_onnx(model, tmp_path / "x.onnx", kv_cache=True)
    assert "causal LM" in err.value.fix and not (tmp_path / "x.onnx").exists()


# ------------------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_deployment_dtype_base_merged_and_unmerged_without_reloading_weights(llama_files, tmp_path, dtype):
    """Trained in fp32, exported in fp16/bf16 from the adapted, merged and base models: files in that dtype, the
    merged one identical to the base; the caller's models stay fp32."""
    _, base, adapted, merged = llama_files
    for name, model in (("base", base), ("merged", merged), ("unmerged", adapted)):
        lora_fx.export_onnx(model, tmp_path / f"{name}.onnx", kv_cache=True, dtype=dtype)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    want = {torch.float16: onnx.TensorProto.FLOAT16, torch.bfloat16: onnx.TensorProto.BFLOAT16}[dtype]
    for name in ("base", "merged", "unmerged"):
        graph = onnx.load(str(tmp_path / f"{name}.onnx")).graph
        assert {i.data_type for i in graph.initializer if len(i.dims) == 2} == {want}, name
        assert graph.output[0].type.tensor_type.elem_type == want
    assert lora_fx.verify_onnx(tmp_path / "base.onnx", tmp_path / "merged.onnx").identical
    if dtype == torch.float16:  # ONNX Runtime's CPU provider has no bf16 kernels (its CUDA provider has)
        ids, mask = left_padded()
        got = lora_fx.generate_onnx(tmp_path / "merged.onnx", ids, mask, max_new_tokens=4, device="cpu")
        unmerged = lora_fx.generate_onnx(tmp_path / "unmerged.onnx", ids, mask, max_new_tokens=4, device="cpu")
        assert got.shape == (2, 11) and torch.equal(got, unmerged)


def test_dtype_of_a_bare_torch_export_graph_is_refused_with_the_way_out(llama_files, tmp_path):
    _, _, adapted, _ = llama_files
    graph = lora_fx.fold(lora_fx.graph(adapted))
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(lora_fx.InputError, match="keeps the casts it was traced with") as err:
        lora_fx.export_onnx(graph, tmp_path / "g.onnx", (ids,), dtype=torch.float16)
    assert "lora_fx.fold(adapted)" in err.value.fix and not (tmp_path / "g.onnx").exists()


# ------------------------------------------------------------------------------------------------ a real client
_GENAI_RUN = r"""
import json, sys
import numpy as np
import onnxruntime_genai as og
folder, prompt, length = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = og.Model(folder)
params = og.GeneratorParams(model)
params.set_search_options(max_length=length, do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(np.array([prompt], dtype=np.int32))
while not generator.is_done():
    generator.generate_next_token()
print(json.dumps([int(t) for t in generator.get_sequence(0)]))
"""


def _genai_python() -> str | None:
    """A Python with onnxruntime-genai: LORA_FX_GENAI_PYTHON, or this one. genai pins the CPU onnxruntime package,
    which cannot sit beside onnxruntime-gpu in one environment, so CI (no genai) skips; run it with a separate venv:
    python3 -m venv /tmp/vg && /tmp/vg/bin/pip install onnxruntime-genai; LORA_FX_GENAI_PYTHON=/tmp/vg/bin/python."""
    import importlib.util
    import os
    import sys

    if os.environ.get("LORA_FX_GENAI_PYTHON"):
        return os.environ["LORA_FX_GENAI_PYTHON"]
    return sys.executable if importlib.util.find_spec("onnxruntime_genai") else None


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_onnxruntime_genai_serves_the_merged_file_with_the_tokens_of_generate(name, tmp_path):
    """onnxruntime-genai, a real client, loads the merged KV-cache file with the genai_config.json lora_fx writes, and
    its greedy tokens equal transformers generate on the merged model (fp32 CPU: the same argmax)."""
    import json
    import subprocess

    python = _genai_python()
    if python is None:
        pytest.skip("onnxruntime-genai not installed (set LORA_FX_GENAI_PYTHON to a Python that has it)")
    _, merged = adapted_and_merged(family(name))
    folder = tmp_path / "genai"
    folder.mkdir()
    lora_fx.export_onnx(merged, folder / "model.onnx", kv_cache=True)
    config = json.loads(lora_fx.write_genai_config(folder / "model.onnx", merged.config).read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 2 and config["model"]["decoder"]["head_size"] == 8
    prompt = [5, 17, 33, 8, 41, 9]
    want = merged.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[0].tolist()
    done = subprocess.run([python, "-c", _GENAI_RUN, str(folder), json.dumps(prompt), str(len(want))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == want


def test_write_genai_config_needs_the_file_and_a_decoder_config(tmp_path):
    with pytest.raises(lora_fx.ExportError, match="does not exist"):
        lora_fx.write_genai_config(tmp_path / "missing.onnx", transformers.LlamaConfig(**SMALL))
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(lora_fx.InputError, match="config has no"):
        lora_fx.write_genai_config(tmp_path / "model.onnx", object())
    assert not (tmp_path / "genai_config.json").exists()


def test_kv_cache_export_of_a_window_smaller_than_its_example_step_says_so(tmp_path):
    """Gemma 2 keeps window - 1 tokens on its sliding layers; the export's step (5 cached + 3 new tokens, sizes
    torch.export must tell apart) cannot fit a window of 4: the error names the window and the size that works."""
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(head_dim=8, sliding_window=4, **SMALL)).eval()
    with pytest.raises(lora_fx.InputError, match=r"more than the model's sliding_window=4") as err:
        lora_fx.export_onnx(model, tmp_path / "g.onnx", kv_cache=True)
    assert "at least 8" in err.value.fix and not (tmp_path / "g.onnx").exists()
