"""The `lora-fx` command line: every subcommand with good and bad input, in-process (main([...])) and through
`python -m lora_fx`. Models come from the factories below, named on the command line as tests.test_cli:make_mlp
(the CLI imports from the current folder, as `python -m` does; the tests run it from the repository root)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import onnx
import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError, load_model, main

ROOT = pathlib.Path(__file__).resolve().parents[1]
FACTORY = "tests.test_cli:make_mlp"


# ------------------------------------------------------------------------------------------------ factories
class CliMLP(nn.Module):
    def __init__(self, d_in: int = 8, d_hidden: int = 16, d_out: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def make_mlp():
    """(model, example_inputs): what a factory for `lora-fx MODEL` returns."""
    torch.manual_seed(0)
    return CliMLP().eval(), (torch.randn(4, 8),)


def make_bare_mlp():
    """A model without example inputs (the command line's --input-shape gives them)."""
    torch.manual_seed(0)
    return CliMLP().eval()


def make_wide_mlp():
    """Another architecture: an adapter of make_mlp does not fit it."""
    torch.manual_seed(0)
    return CliMLP(8, 32, 4).eval(), (torch.randn(4, 8),)


def make_broken():
    raise RuntimeError("the factory's own bug")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
    """Run every command from the repository root (so tests.test_cli imports) and undo its sys.path change."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An adapter folder (trained-looking B), the base export and the unmerged adapted export of make_mlp."""
    from lora_fx.adapter_file import save_adapter

    d = tmp_path_factory.mktemp("cli")
    model, args = make_mlp()
    adapted = lora_fx.adapt(model, [lora_fx.Rule(name="fc1", r=2, alpha=4)], example_inputs=args)
    torch.manual_seed(1)
    for lora in adapted.lora_fx.values():
        nn.init.normal_(lora.lora_B, std=0.1)
    save_adapter(adapted, d / "adapter")
    lora_fx.export_onnx(model, d / "base.onnx", args)
    lora_fx.export_onnx(adapted, d / "unmerged.onnx", args)
    return d


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(err: str, *needles: str) -> None:
    """The CLI's error format: a line `error: ...` then a line `hint: ...`, and no traceback."""
    lines = err.strip().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert any(line.startswith("hint: ") for line in lines[first + 1:]), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


# ------------------------------------------------------------------------------------------------ general
def test_help_and_no_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == EXIT_OK
    for command in ("plan", "export", "verify", "fold-onnx"):
        assert command in out
    code, _, err = run(capsys)
    assert code == EXIT_USAGE and "usage: lora-fx" in err


def test_usage_errors_exit_2(capsys):
    code, _, err = run(capsys, "plan")
    assert code == EXIT_USAGE
    assert_error(err, "required: MODEL", "lora-fx plan --help")
    code, _, err = run(capsys, "plan", FACTORY, "--input-shape", "2,a")
    assert code == EXIT_USAGE
    assert_error(err, "'2,a' is not a shape")
    code, _, err = run(capsys, "plan", "not-a-factory")
    assert code == EXIT_USAGE
    assert_error(err, "neither a folder on disk nor package.module:function")
    code, _, err = run(capsys, "frobnicate")
    assert code == EXIT_USAGE and "invalid choice" in err


# ------------------------------------------------------------------------------------------------ plan
def test_plan_table(capsys):
    code, out, err = run(capsys, "plan", FACTORY)
    assert code == EXIT_OK, err
    assert out.splitlines()[0].split()[:4] == ["site", "op", "shape", "roles"]
    assert "fc1" in out and "fc2" in out
    # fc1 16x8 at r=8: 8·(8+16); fc2 4x16 caps the default r=8 at 4: 4·(16+4)
    assert "4 (capped from 8)" in out
    assert "2 of 2 sites adapted, 272 LoRA parameters, front end: fx" in out


def test_plan_json_with_rules_file(capsys, tmp_path):
    rules = tmp_path / "lora.toml"
    rules.write_text('[defaults]\nr = 4\n\n[[rule]]\nname = "fc2"\nexclude = true\n\n[[rule]]\nname = "fc1"\n')
    code, out, err = run(capsys, "plan", FACTORY, "--rules", rules, "--json")
    assert code == EXIT_OK, err
    plan = json.loads(out)
    rows = {row["site"]: row for row in plan["sites"]}
    assert rows["fc1"]["adapted"] and rows["fc1"]["r"] == 4 and rows["fc1"]["rule"] == 1
    assert not rows["fc2"]["adapted"] and rows["fc2"]["rule"] == 0
    assert plan["parameters_added"] == 4 * (8 + 16)


def test_plan_input_shape_for_a_bare_model(capsys):
    code, out, err = run(capsys, "plan", "tests.test_cli:make_bare_mlp", "--input-shape", "3,8", "--frontend", "fx")
    assert code == EXIT_OK, err
    assert "2 of 2 sites adapted" in out and "front end: fx" in out


def test_plan_bad_inputs(capsys, tmp_path):
    code, _, err = run(capsys, "plan", "tests.test_cli:make_mlpp")
    assert code == EXIT_FAILED
    assert_error(err, "has no attribute 'make_mlpp'", "did you mean tests.test_cli:make_mlp")
    code, _, err = run(capsys, "plan", "tests.no_such_module:f")
    assert code == EXIT_FAILED
    assert_error(err, "cannot import 'tests.no_such_module'")
    code, _, err = run(capsys, "plan", "tests.test_cli:make_broken")
    assert code == EXIT_FAILED
    assert_error(err, "the factory tests.test_cli:make_broken failed: RuntimeError: the factory's own bug")
    code, _, err = run(capsys, "plan", FACTORY, "--input-shape", "2,9")  # fc1 takes 8 features
    assert code == EXIT_FAILED
    assert_error(err, "the example inputs do not fit the model", "--input-shape")
    bad = tmp_path / "lora.toml"
    bad.write_text("[[rule]]\nname = 'fc1'\nrank = 4\n")
    code, _, err = run(capsys, "plan", FACTORY, "--rules", bad)
    assert code == EXIT_FAILED
    assert_error(err, "unknown field(s) ['rank']", f"{bad}: rule 0", "hint: fields are")


def test_verbose_prints_the_traceback(capsys):
    code, _, err = run(capsys, "--verbose", "plan", "tests.test_cli:make_broken")
    assert code == EXIT_FAILED
    assert "Traceback" in err and "the factory's own bug" in err and "error: " in err
    code, _, err = run(capsys, "plan", "tests.test_cli:make_broken", "-v")  # after the command too
    assert "Traceback" in err


def test_transformers_folder(tmp_path):
    """MODEL as a config folder: built from config.json (architectures -> class), use_cache off, default ids."""
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                             architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(CliError, match="holds no weights") as info:  # random weights only on request
        load_model(str(tmp_path))
    assert "--random-weights" in info.value.hint
    loaded = load_model(str(tmp_path), random_weights=True)
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and not loaded.model.training
    assert loaded.kwargs == {"use_cache": False}
    (ids,) = loaded.args
    assert ids.shape == (2, 16) and ids.dtype == torch.long and int(ids.max()) < 50
    (ids,) = load_model(str(tmp_path), input_ids=(3, 5), random_weights=True).args
    assert ids.shape == (3, 5)


def test_transformers_folder_errors(capsys, tmp_path):
    code, _, err = run(capsys, "plan", tmp_path)
    assert code == EXIT_USAGE
    assert_error(err, "folder without config.json")


def test_plan_transformers_folder(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                             architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    code, out, err = run(capsys, "plan", tmp_path, "--input-ids", "2,8")
    assert code == EXIT_OK, err
    assert "model.layers.0.self_attn.q_proj" in out and "front end: export" in out


# ------------------------------------------------------------------------------------------------ export
def test_export(capsys, files, tmp_path):
    out_path, base_path = tmp_path / "merged.onnx", tmp_path / "base.onnx"
    code, out, err = run(capsys, "export", FACTORY, "--adapter", files / "adapter", "--out", out_path,
                         "--base-out", base_path)
    assert code == EXIT_OK, err
    assert "ONNX structure: IDENTICAL" in out
    assert "adapted with the adapter" in err and "1 LoRA weight(s)" in err
    assert lora_fx.verify_onnx(base_path, out_path).identical
    # the merged file computes the folded model: its fc1 weight moved, fc2's did not
    import onnx
    from onnx import numpy_helper

    base = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(base_path)).graph.initializer}
    merged = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out_path)).graph.initializer}
    assert not (base["fc1.weight"] == merged["fc1.weight"]).all()
    assert (base["fc2.weight"] == merged["fc2.weight"]).all()


def test_export_of_an_adapter_trained_on_a_quantized_base_folds_what_was_trained(capsys, tmp_path):
    """The adapter file records the FP8 base it was trained against: export quantizes the same weights again and
    folds into the dequantized ones, so the merged file holds what training computed, not W0 + delta."""
    model, args = make_mlp()
    adapted = lora_fx.adapt(model, [lora_fx.Rule(name="fc1", r=2, alpha=4)], example_inputs=args)
    lora_fx.quantize_base(adapted, "fp8")
    torch.manual_seed(1)
    for lora in adapted.lora_fx.values():
        nn.init.normal_(lora.lora_B, std=0.1)
    lora_fx.save_adapter(adapted, tmp_path / "adapter")
    expected = lora_fx.fold(adapted).fc1.weight.detach().numpy()
    plain = lora_fx.fold(adapted, base="original").fc1.weight.detach().numpy()
    out_path = tmp_path / "merged.onnx"
    code, out, err = run(capsys, "export", FACTORY, "--adapter", tmp_path / "adapter", "--out", out_path)
    assert code == EXIT_OK, err
    assert "trained against a fp8 base" in err and "ONNX structure: IDENTICAL" in out
    from onnx import numpy_helper

    merged = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out_path)).graph.initializer}
    assert (merged["fc1.weight"] == expected).all() and not (merged["fc1.weight"] == plain).all()


def test_export_from_a_peft_folder(capsys, files, tmp_path):
    """--adapter also takes a PEFT LoRA folder (adapter_model.safetensors), loaded with load_peft_adapter."""
    from lora_fx.peft_compat import save_peft_adapter

    model, args = make_mlp()
    adapted = lora_fx.adapt(model, [lora_fx.Rule(name="fc2", r=2)], example_inputs=args)
    for lora in adapted.lora_fx.values():
        nn.init.normal_(lora.lora_B, std=0.1)
    save_peft_adapter(adapted, tmp_path / "peft")
    code, out, err = run(capsys, "export", FACTORY, "--adapter", tmp_path / "peft", "--out", tmp_path / "m.onnx",
                         "--parity")
    assert code == EXIT_OK, err
    assert "PEFT adapter" in err and "ONNX structure: IDENTICAL" in out and "parity: OK" in out
    # the same folder saved as a pickle (PEFT's safe_serialization=False) is refused as one, with how to re-save it
    import safetensors.torch

    weights = safetensors.torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    (tmp_path / "peft" / "adapter_model.safetensors").unlink()
    torch.save(weights, tmp_path / "peft" / "adapter_model.bin")
    code, out, err = run(capsys, "export", FACTORY, "--adapter", tmp_path / "peft", "--out", tmp_path / "p.onnx")
    assert code == EXIT_FAILED
    assert_error(err, "adapter_model.safetensors is missing", "pickle", "safe_serialization=True")
    assert not (tmp_path / "p.onnx").exists()


def test_export_bad_inputs(capsys, files, tmp_path):
    out_path = tmp_path / "merged.onnx"
    code, _, err = run(capsys, "export", FACTORY, "--adapter", tmp_path / "nowhere", "--out", out_path)
    assert code == EXIT_FAILED
    assert_error(err, "the adapter folder does not exist")
    code, _, err = run(capsys, "export", "tests.test_cli:make_wide_mlp", "--adapter", files / "adapter",
                       "--out", out_path)
    assert code == EXIT_FAILED
    assert_error(err, "does not fit")
    code, _, err = run(capsys, "export", "tests.test_cli:make_bare_mlp", "--adapter", files / "adapter",
                       "--out", out_path)
    assert code == EXIT_USAGE
    assert_error(err, "export needs example inputs", "--input-shape")
    code, _, err = run(capsys, "export", FACTORY, "--out", out_path)
    assert code == EXIT_USAGE
    assert_error(err, "--adapter")
    # output paths are checked before anything is exported: no base file is left beside a failed merged one
    base_path = tmp_path / "base.onnx"
    code, _, err = run(capsys, "export", FACTORY, "--adapter", files / "adapter", "--out", out_path,
                       "--base-out", out_path)
    assert code == EXIT_FAILED
    assert_error(err, "--out and --base-out are the same file")
    code, _, err = run(capsys, "export", FACTORY, "--adapter", files / "adapter", "--out",
                       tmp_path / "no-such-folder" / "merged.onnx", "--base-out", base_path)
    assert code == EXIT_FAILED
    assert_error(err, "does not exist")
    assert not out_path.exists() and not base_path.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ verify
def test_verify(capsys, files, tmp_path):
    code, out, err = run(capsys, "verify", files / "base.onnx", files / "base.onnx")
    assert code == EXIT_OK, err
    assert "ONNX structure: IDENTICAL" in out
    code, out, err = run(capsys, "verify", files / "base.onnx", files / "unmerged.onnx")
    assert code == EXIT_FAILED
    assert "ONNX structure: DIFFERENT" in out and "lora_fx.fc1.lora_A" in out
    assert err == ""  # a difference is a result, not an error


def test_verify_bad_inputs(capsys, files, tmp_path):
    code, _, err = run(capsys, "verify", files / "base.onnx", tmp_path / "missing.onnx")
    assert code == EXIT_FAILED
    assert_error(err, "ONNX file does not exist", "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    code, _, err = run(capsys, "verify", junk, files / "base.onnx")
    assert code == EXIT_FAILED
    assert_error(err, "is not a valid ONNX model")
    code, _, err = run(capsys, "verify", files / "base.onnx")
    assert code == EXIT_USAGE


# ------------------------------------------------------------------------------------------------ fold-onnx
def test_fold_onnx(capsys, files, tmp_path):
    out_path = tmp_path / "merged.onnx"
    code, out, err = run(capsys, "fold-onnx", files / "unmerged.onnx", "--out", out_path, "--base",
                         files / "base.onnx")
    assert code == EXIT_OK, err
    assert "1 LoRA branch(es) folded, 0 refused" in out and "ONNX structure: IDENTICAL" in out
    assert lora_fx.verify_onnx(files / "base.onnx", out_path).identical


def test_fold_onnx_bad_inputs(capsys, files, tmp_path, monkeypatch):
    out_path = tmp_path / "merged.onnx"
    code, _, err = run(capsys, "fold-onnx", tmp_path / "missing.onnx", "--out", out_path)
    assert code == EXIT_FAILED
    assert_error(err, "the ONNX file does not exist")
    code, _, err = run(capsys, "fold-onnx", files / "base.onnx", "--out", out_path)  # nothing to fold
    assert code == EXIT_FAILED
    assert_error(err, "has no LoRA branch to fold", "UNMERGED")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # a failed call writes nothing (it wrote a copy)
    code, _, err = run(capsys, "fold-onnx", files / "unmerged.onnx")
    assert code == EXIT_USAGE
    monkeypatch.setitem(sys.modules, "lora_fx.onnx.fold", None)  # an installation without the ONNX fold
    code, _, err = run(capsys, "fold-onnx", files / "unmerged.onnx", "--out", out_path)
    assert code == EXIT_FAILED
    assert_error(err, "the ONNX-level fold is not available", "lora-fx export")


# ------------------------------------------------------------------------------------------------ python -m lora_fx
def test_python_m_lora_fx():
    """The real entry: a separate interpreter, the factory imported from the current folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ok = subprocess.run([sys.executable, "-m", "lora_fx", "plan", FACTORY, "--json"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert [row["site"] for row in json.loads(ok.stdout)["sites"]] == ["fc1", "fc2"]


# ------------------------------------------------------------------------------------------------ untrusted input
class LongNamesMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.projection_of_the_input_to_hidden_units = nn.Linear(8, 8)

    def forward(self, x):
        return self.projection_of_the_input_to_hidden_units(x)


def make_long_names():
    torch.manual_seed(0)
    return LongNamesMLP().eval(), (torch.randn(2, 8),)


def test_plan_with_a_rules_file_regex_that_backtracks(capsys, tmp_path):
    from conftest import deadline

    rules = tmp_path / "lora.toml"
    rules.write_text('[[rule]]\nname = "(?:[a-z_.0-9]|[a-z_.0-9])*[A-Z]"\n')
    with deadline(30):
        code, _, err = run(capsys, "plan", "tests.test_cli:make_long_names", "--rules", rules)
    assert code == EXIT_FAILED
    assert_error(err, "`name` is unusable", "backtracks", f"{rules}: rule 0", "hint: simplify the pattern")


def _llama_folder(path: pathlib.Path, drop: tuple[str, ...] | None = None) -> pathlib.Path:
    """A saved tiny Llama; drop: tensors to remove from model.safetensors (() empties it)."""
    import safetensors.torch

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      architectures=["LlamaForCausalLM"])
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    if drop is not None:
        tensors = safetensors.torch.load_file(str(path / "model.safetensors"))
        kept = {k: v for k, v in tensors.items() if drop and k not in drop}
        safetensors.torch.save_file(kept, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("drop, words", [
    ((), ["miss 12 of the model's tensors", "model.embed_tokens.weight"]),
    (("model.norm.weight",), ["miss 1 of the model's tensors", "model.norm.weight"]),
])
def test_export_refuses_missing_weights_unless_asked(capsys, files, tmp_path, drop, words):
    """A weights file without (all) the tensors used to export random weights and exit 0."""
    folder = _llama_folder(tmp_path / "model", drop)
    out_path = tmp_path / "merged.onnx"
    code, _, err = run(capsys, "export", folder, "--adapter", files / "adapter", "--out", out_path)
    assert code == EXIT_FAILED
    assert_error(err, *words, "hint:", "--random-weights")
    assert not out_path.exists()
    loaded = load_model(str(folder), random_weights=True)  # on request: random values for what is missing
    assert "random" in loaded.description


def test_export_refuses_a_config_only_folder_unless_asked(capsys, files, tmp_path):
    folder = tmp_path / "model"
    _llama_folder(folder)
    (folder / "model.safetensors").unlink()
    code, _, err = run(capsys, "export", folder, "--adapter", files / "adapter", "--out", tmp_path / "m.onnx")
    assert code == EXIT_FAILED
    assert_error(err, "holds no weights", "--random-weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_stray_module_in_the_current_folder_does_not_shadow_installed_packages(files, tmp_path):
    """The current folder is importable for the user's factory only, after the installed packages: an
    onnxscript.py there is never imported (it was, ahead of the real onnxscript, and broke the export)."""
    (tmp_path / "onnxscript.py").write_text("raise ImportError('the stray onnxscript.py was imported')\n")
    (tmp_path / "stray_models.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class CliMLP(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)\n\n"
        "    def forward(self, x):\n"
        "        return self.fc2(torch.relu(self.fc1(x)))\n\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return CliMLP().eval(), (torch.randn(4, 8),)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = pathlib.Path(sys.executable).parent / "lora-fx"
    for argv in ([str(script)], [sys.executable, "-m", "lora_fx"]):
        if not pathlib.Path(argv[0]).exists():
            continue
        done = subprocess.run(argv + ["export", "stray_models:make", "--adapter", str(files / "adapter"), "--out",
                                      "m.onnx"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
        assert "stray onnxscript" not in done.stderr and "ONNX structure: IDENTICAL" in done.stdout
        (tmp_path / "m.onnx").unlink()


# ------------------------------------------------------------------------------------------------ KV cache, generate
def test_export_kv_cache_and_generate(capsys, tmp_path):
    """export --kv-cache writes base and merged decoder files with a cache that verify identical and generate the
    folded model's tokens (--parity); generate runs a left-padded batch; errors say what and how."""
    transformers = pytest.importorskip("transformers")
    import lora_fx
    from lora_fx.adapter_file import save_adapter

    folder = _llama_folder(tmp_path / "model")
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    adapted = lora_fx.adapt(model, [lora_fx.Rule(name="q_proj|v_proj", r=2, alpha=4)], example_inputs=(ids,),
                            example_kwargs={"use_cache": False})
    torch.manual_seed(1)
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_B.normal_(0, 0.5)
    save_adapter(adapted, tmp_path / "adapter")
    merged_path = tmp_path / "merged.onnx"
    code, out, err = run(capsys, "export", folder, "--adapter", tmp_path / "adapter", "--out", merged_path,
                         "--base-out", tmp_path / "base.onnx", "--kv-cache", "--parity", "--input-ids", "2,6")
    assert code == EXIT_OK, err
    assert "IDENTICAL" in out.upper() and "generate parity: OK" in out
    assert any(i.name == "past_key_values.0.key" for i in onnx.load(str(merged_path)).graph.input)

    code, out, err = run(capsys, "generate", merged_path, "--prompt-ids", "5,6,7", "--prompt-ids", "8,9",
                         "--max-new-tokens", "4", "--device", "cpu")
    assert code == EXIT_OK, err
    rows = [[int(t) for t in line.split(",")] for line in out.strip().splitlines()]
    x, mask = torch.tensor([[5, 6, 7], [0, 8, 9]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
    want = lora_fx.fold(adapted).generate(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                          pad_token_id=0)
    assert rows == [want[0].tolist(), want[1, 1:].tolist()]

    code, _, err = run(capsys, "generate", tmp_path / "missing.onnx", "--prompt-ids", "1,2")
    assert code == EXIT_FAILED
    assert_error(err, "does not exist", "--kv-cache")
    code, _, err = run(capsys, "generate", merged_path, "--prompt-ids", "1,x")
    assert code == EXIT_USAGE
    code, _, err = run(capsys, "generate", merged_path, "--prompt-ids", "1,2", "--max-new-tokens", "0",
                       "--device", "cpu")
    assert code == EXIT_FAILED
    assert_error(err, "max_new_tokens must be at least 1")
