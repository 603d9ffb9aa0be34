"""Adapter files: save/load round trip, atomic saves, and precise errors for every way a file can fail to fit."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import fx, nn

import lora_fx
from lora_fx.adapter_file import (CONFIG_FILE, WEIGHTS_FILE, LoadReport, adapt_from_adapter, load_adapter,
                                  save_adapter)
from lora_fx.errors import AdapterFileError

REPO = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return x + self.o(torch.tanh(self.q(x)) * self.k(x) + self.v(x))


class Tiny(nn.Module):
    def __init__(self, d: int = 16, n: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Outer(nn.Module):
    """Has both "layers.0.q" and "enc.layers.0.q": a dotted-suffix name rule would take both."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.enc = Tiny(d)
        self.layers = nn.ModuleList([Block(d)])

    def forward(self, x):
        return self.enc(self.layers[0](x))


def make(d: int = 16, seed: int = 0, cls=Tiny) -> nn.Module:
    torch.manual_seed(seed)
    return cls(d).eval()


def example(d: int = 16) -> torch.Tensor:
    return torch.randn(3, d, generator=torch.Generator().manual_seed(1))


QV = [lora_fx.Rule(name="q|v", r=4, alpha=8)]


def adapt(model, rules=QV, d: int = 16):
    return lora_fx.adapt(model, rules, example_inputs=(example(d),))


def randomize(adapted, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_A.copy_(torch.randn(lora.lora_A.shape, generator=g))
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g))


def lora_values(adapted) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lora_fx.lora_state_dict(adapted).items()}


def saved(tmp_path: Path, rules=QV, d: int = 16, seed: int = 2) -> tuple[Path, nn.Module]:
    adapted = adapt(make(d), rules, d)
    randomize(adapted, seed)
    return save_adapter(adapted, tmp_path / "adapter"), adapted


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------------------------------------------- round trip
def test_round_trip_gives_equal_outputs(tmp_path):
    directory, adapted = saved(tmp_path)
    x = example()
    assert sorted(os.listdir(directory)) == [WEIGHTS_FILE, CONFIG_FILE]
    tensors = safetensors.torch.load_file(str(directory / WEIGHTS_FILE))
    expected_keys = {f"layers.{i}.{m}.weight.{p}" for i in (0, 1) for m in "qv" for p in ("lora_A", "lora_B")}
    assert set(tensors) == expected_keys  # only A and B, keyed by the base weight
    assert tensors["layers.1.v.weight.lora_A"].shape == (4, 16) and tensors["layers.1.v.weight.lora_B"].shape == (16, 4)
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert config["format"] == "lora_fx.adapter" and config["format_version"] == 1 and config["lora_fx_version"]
    w = config["weights"]["layers.0.q.weight"]
    assert (w["r"], w["alpha"], w["scaling"], w["layout"], w["in_features"], w["out_features"], w["dtype"]) == \
           (4, 8.0, "standard", "out_in", 16, 16, "float32")

    fresh = adapt(make())  # same base weights, LoRA B = 0
    assert not torch.allclose(fresh(x), adapted(x))
    report = load_adapter(fresh, directory)
    assert isinstance(report, LoadReport) and sorted(report.loaded) == sorted(l.weight_name for l in adapted.lora_fx.values())
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(fresh(x), adapted(x))
    assert all(torch.equal(a, b) for a, b in zip(lora_values(fresh).values(), lora_values(adapted).values()))


def test_adapt_from_adapter_rebuilds_exact_weights_and_settings(tmp_path):
    rules = [lora_fx.Rule(glob="layers.0.q", r=2, alpha=4, scaling="rslora"),  # top-level layers.0.q only
             lora_fx.Rule(glob="enc.layers.1.v", r=3, alpha=6, dropout=0.1)]
    adapted = lora_fx.adapt(make(cls=Outer), rules, example_inputs=(example(),))
    randomize(adapted)
    save_adapter(adapted, tmp_path / "a")

    rebuilt = adapt_from_adapter(make(cls=Outer), tmp_path / "a", example_inputs=(example(),))
    got = {l.weight_name: (l.r, l.alpha, l.scaling_kind, l.dropout.p if isinstance(l.dropout, nn.Dropout) else 0.0)
           for l in rebuilt.lora_fx.values()}
    # a name= rule built from "layers.0.q.weight" would also take "enc.layers.0.q.weight" (dotted-suffix match)
    assert got == {"layers.0.q.weight": (2, 4.0, "rslora", 0.0), "enc.layers.1.v.weight": (3, 6.0, "standard", 0.1)}
    adapted.eval(), rebuilt.eval()
    assert torch.equal(rebuilt(example()), adapted(example()))


def test_save_accepts_a_wrapped_module(tmp_path):
    directory, adapted = saved(tmp_path)
    save_adapter(nn.DataParallel(adapted), tmp_path / "again")  # on CPU a plain wrapper, as DDP is on GPUs
    again = safetensors.torch.load_file(str(tmp_path / "again" / WEIGHTS_FILE))
    first = safetensors.torch.load_file(str(directory / WEIGHTS_FILE))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


# ---------------------------------------------------------------------------------------------------- atomic saves
def _fail_in_safetensors(monkeypatch):
    real = safetensors.torch.save_file

    def half_written(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # leave a truncated file behind, as a crash mid-write would
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)


def _fail_in_json(monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(json, "dumps", broken)


@pytest.mark.parametrize("fail", [_fail_in_safetensors, _fail_in_json], ids=["safetensors", "json"])
def test_failed_save_keeps_previous_adapter_and_leaves_no_litter(tmp_path, monkeypatch, fail):
    directory, adapted = saved(tmp_path)
    before = file_bytes(directory)
    randomize(adapted, seed=99)  # new values that must not reach the folder
    with monkeypatch.context() as m:
        fail(m)
        with pytest.raises(AdapterFileError, match="previous content .* unchanged"):
            save_adapter(adapted, directory)
    assert file_bytes(directory) == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary folder left
    fresh = adapt(make())
    load_adapter(fresh, directory)  # the previous adapter still loads
    # and a first save that fails creates nothing at all
    with monkeypatch.context() as m:
        fail(m)
        with pytest.raises(AdapterFileError):
            save_adapter(adapted, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    # once the failure is gone, the save replaces the folder with the new values
    save_adapter(adapted, directory)
    assert file_bytes(directory) != before
    load_adapter(fresh, directory)
    assert torch.equal(fresh(example()), adapted(example()))


def test_killed_save_keeps_previous_adapter_and_next_save_cleans_up(tmp_path):
    """A process killed (os._exit, no cleanup at all) in the middle of writing the new adapter."""
    script = textwrap.dedent(f"""
        import os, shutil, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import safetensors.torch
        from test_adapter_file import adapt, make, randomize
        from lora_fx.adapter_file import save_adapter
        target = {str(tmp_path / "adapter")!r}
        adapted = adapt(make()); randomize(adapted, 1)
        save_adapter(adapted, target)
        shutil.copytree(target, {str(tmp_path / "expected")!r})
        randomize(adapted, 2)
        real = safetensors.torch.save_file
        def killed(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(10)
            os._exit(9)
        safetensors.torch.save_file = killed
        save_adapter(adapted, target)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert file_bytes(tmp_path / "adapter") == file_bytes(tmp_path / "expected")
    litter = [p for p in os.listdir(tmp_path) if p.startswith(".adapter.")]
    assert len(litter) == 1  # the killed process's temporary folder; the next save removes it
    _, adapted = saved(tmp_path / "other")
    save_adapter(adapted, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path)) == ["adapter", "expected", "other"]


def test_save_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "notes.txt").write_text("mine")
    _, adapted = saved(tmp_path / "elsewhere")
    with pytest.raises(AdapterFileError, match="notes.txt"):
        save_adapter(adapted, tmp_path / "adapter")
    assert os.listdir(tmp_path / "adapter") == ["notes.txt"]


# ---------------------------------------------------------------------------------------------------- what does not fit
def test_shape_mismatch_says_what_was_expected_and_found(tmp_path):
    directory, _ = saved(tmp_path, d=16)
    other = adapt(make(d=24), d=24)  # same names, other widths
    before = lora_values(other)
    with pytest.raises(AdapterFileError) as e:
        load_adapter(other, directory)
    msg = str(e.value)
    assert "layers.0.q.weight.lora_A: shape (r, in) expected (4, 24), found (4, 16)" in msg
    assert "layers.1.v.weight.lora_B: shape (out, r) expected (24, 4), found (16, 4)" in msg
    assert "nothing was loaded" in msg
    assert all(torch.equal(before[k], v) for k, v in lora_values(other).items())  # nothing copied


def test_rank_and_alpha_mismatch(tmp_path):
    directory, _ = saved(tmp_path)
    other = adapt(make(), [lora_fx.Rule(name="q|v", r=2, alpha=8)])
    with pytest.raises(AdapterFileError) as e:
        load_adapter(other, directory)
    assert "expected (2, 16), found (4, 16)" in str(e.value) and "r=4 in the file, r=2 in the adapted model" in str(e.value)
    other = adapt(make(), [lora_fx.Rule(name="q|v", r=4, alpha=16)])
    with pytest.raises(AdapterFileError, match=r"alpha=8.0 in the file, alpha=16.0 in the adapted model"):
        load_adapter(other, directory)
    other = adapt(make(), [lora_fx.Rule(name="q|v", r=4, alpha=8, scaling="rslora")])  # alpha/sqrt(r), not alpha/r
    before = lora_values(other)
    with pytest.raises(AdapterFileError, match=r"scaling='standard' in the file, scaling='rslora' in the adapted"):
        load_adapter(other, directory)
    assert all(torch.equal(before[k], v) for k, v in lora_values(other).items())


def test_missing_and_extra_weights(tmp_path):
    directory, adapted = saved(tmp_path)  # q and v
    other = adapt(make(), [lora_fx.Rule(name="q|k", r=4, alpha=8)])
    before = lora_values(other)
    with pytest.raises(AdapterFileError) as e:
        load_adapter(other, directory)
    msg = str(e.value)
    assert "missing weights (adapted in the model, not in the file): ['layers.0.k.weight', 'layers.1.k.weight']" in msg
    assert "extra weights (in the file, not adapted in the model)" in msg and "layers.1.v.weight.lora_B" in msg
    assert all(torch.equal(before[k], v) for k, v in lora_values(other).items())
    report = load_adapter(other, directory, strict=False)  # loads what both have
    assert sorted(report.loaded) == ["layers.0.q.weight", "layers.1.q.weight"]
    assert report.missing == ["layers.0.k.weight", "layers.1.k.weight"]
    assert len(report.unexpected) == 4
    assert torch.equal(other.lora_fx.layers_0_q.lora_B, adapted.lora_fx.layers_0_q.lora_B)
    assert torch.equal(other.lora_fx.layers_0_k.lora_B, before["lora_fx.layers_0_k.lora_B"])


@pytest.mark.parametrize("keep", [0, 7, 100, -9])
def test_truncated_safetensors(tmp_path, keep):
    directory, _ = saved(tmp_path)
    data = (directory / WEIGHTS_FILE).read_bytes()
    (directory / WEIGHTS_FILE).write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(AdapterFileError, match="adapter.safetensors is truncated or corrupt"):
        load_adapter(adapt(make()), directory)


def test_corrupt_json(tmp_path):
    directory, _ = saved(tmp_path)
    text = (directory / CONFIG_FILE).read_text()
    (directory / CONFIG_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(AdapterFileError, match=r"adapter_config.json is not valid JSON: .* at line \d+ column \d+"):
        load_adapter(adapt(make()), directory)
    (directory / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(AdapterFileError, match="JSON list, not an object"):
        load_adapter(adapt(make()), directory)
    config = json.loads(text)
    config["weights"]["layers.0.q.weight"]["r"] = 8  # valid JSON that disagrees with the tensors
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=r"layers.0.q.weight.lora_A: the config says shape \(8, 16\), the tensor "
                                               r"has \(4, 16\)"):
        load_adapter(adapt(make()), directory)


def test_dtypes(tmp_path):
    directory, adapted = saved(tmp_path)
    tensors = safetensors.torch.load_file(str(directory / WEIGHTS_FILE))
    config = json.loads((directory / CONFIG_FILE).read_text())
    # an integer tensor is never a LoRA weight, whatever the config says
    bad = dict(tensors, **{"layers.0.q.weight.lora_A": tensors["layers.0.q.weight.lora_A"].to(torch.int64)})
    safetensors.torch.save_file(bad, str(directory / WEIGHTS_FILE))
    with pytest.raises(AdapterFileError, match="layers.0.q.weight.lora_A: dtype int64 in adapter.safetensors, "
                                               "float32 in adapter_config.json"):
        load_adapter(adapt(make()), directory)
    config["weights"]["layers.0.q.weight"]["dtype"] = "int64"
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="dtype 'int64' is not a floating-point torch dtype"):
        load_adapter(adapt(make()), directory)
    # a consistent fp16 adapter loads, cast to the LoRA's fp32
    half = {k: v.half() for k, v in tensors.items()}
    for w in config["weights"].values():
        w["dtype"] = "float16"
    safetensors.torch.save_file(half, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    fresh = adapt(make())
    load_adapter(fresh, directory)
    assert fresh.lora_fx.layers_0_q.lora_A.dtype == torch.float32
    assert torch.equal(fresh.lora_fx.layers_0_q.lora_A, half["layers.0.q.weight.lora_A"].float())
    # non-finite values are refused
    half["layers.1.v.weight.lora_B"][0, 0] = float("nan")
    safetensors.torch.save_file(half, str(directory / WEIGHTS_FILE))
    with pytest.raises(AdapterFileError, match="layers.1.v.weight.lora_B: holds NaN or Inf"):
        load_adapter(adapt(make()), directory)


def test_loading_into_a_module_that_was_not_adapted(tmp_path):
    directory, _ = saved(tmp_path)
    for target in (make(), fx.symbolic_trace(make())):
        with pytest.raises(lora_fx.NotAdaptedError, match="not adapted by lora_fx") as e:
            load_adapter(target, directory)
        assert "adapt_from_adapter" in str(e.value)
        with pytest.raises(lora_fx.NotAdaptedError, match="not adapted by lora_fx"):
            save_adapter(target, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        load_adapter(adapt(make()), tmp_path / "nope")
    directory, _ = saved(tmp_path)
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterFileError, match="adapter.safetensors is missing"):
        load_adapter(adapt(make()), directory)


def test_adapt_from_adapter_on_a_model_with_other_widths(tmp_path):
    directory, _ = saved(tmp_path, d=16)
    with pytest.raises(AdapterFileError, match=r"shape \(r, in\) expected \(4, 24\), found \(4, 16\)"):
        adapt_from_adapter(make(d=24), directory, example_inputs=(example(24),))
    with pytest.raises(AdapterFileError, match=r"shape \(r, in\) expected \(4, 3\), found \(4, 16\)"):
        adapt_from_adapter(make(d=3), directory, example_inputs=(example(3),))  # r=4 > 3 as the file says


class _Boom:
    """Unpickling this creates a marker file: it must never happen."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_never_unpickles(tmp_path):
    directory, _ = saved(tmp_path)
    marker = tmp_path / "unpickled"
    (directory / WEIGHTS_FILE).write_bytes(pickle.dumps({"layers.0.q.weight.lora_A": _Boom(str(marker))}))
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        load_adapter(adapt(make()), directory)
    assert not marker.exists()


def test_named_adapters_and_merged_adapters(tmp_path):
    x = example()
    adapted = adapt(make())
    lora_fx.add_adapter(adapted, "k_only", [lora_fx.Rule(name="k", r=2, alpha=2)])
    with torch.no_grad():
        adapted.lora_fx_k_only.layers_1_k.lora_B.normal_()
    save_adapter(adapted, tmp_path / "k", adapter="k_only")
    config = json.loads((tmp_path / "k" / CONFIG_FILE).read_text())
    assert config["adapter"] == "k_only" and sorted(config["weights"]) == ["layers.0.k.weight", "layers.1.k.weight"]
    other = adapt(make())
    lora_fx.add_adapter(other, "k_only", [lora_fx.Rule(name="k", r=2, alpha=2)])
    with pytest.raises(AdapterFileError, match="missing weights"):  # the default adapter (q, v) does not fit
        load_adapter(other, tmp_path / "k")
    load_adapter(other, tmp_path / "k", adapter="k_only")
    assert torch.equal(other.lora_fx_k_only.layers_1_k.lora_B, adapted.lora_fx_k_only.layers_1_k.lora_B)
    with pytest.raises(lora_fx.NotAdaptedError, match="no adapter named 'nope'"):
        load_adapter(other, tmp_path / "k", adapter="nope")
    # loading into a merged adapter would leave W0 stale
    lora_fx.merge_adapter(other, "k_only")
    with pytest.raises(AdapterFileError, match="is merged into the base weights"):
        load_adapter(other, tmp_path / "k", adapter="k_only")
    lora_fx.unmerge_adapter(other)
    # a fresh model adapted from the file computes what `adapted` computes with only that adapter enabled
    rebuilt = adapt_from_adapter(make(), tmp_path / "k", example_inputs=(x,))
    lora_fx.set_adapter(adapted, "k_only")
    assert torch.equal(rebuilt(x), adapted(x))


class FusedAttention(nn.Module):
    """One Linear makes q, k and v (as GPT-2's c_attn): LoRA by role goes on row slices of that weight."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.qkv, self.o, self.heads, self.d = nn.Linear(d, 3 * d), nn.Linear(d, d), heads, d

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(self.d, dim=-1))
        a = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
        return self.o(a.transpose(1, 2).reshape(b, t, self.d))


def test_row_slices_of_a_packed_weight_round_trip(tmp_path):
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    model = make(cls=FusedAttention)
    adapted = lora_fx.adapt(model, [lora_fx.Rule(role=["attn.q", "attn.v"], r=2, alpha=4)], example_inputs=(x,))
    assert sorted(l.rows for l in adapted.lora_fx.values()) == [((0, 16),), ((32, 48),)]
    randomize(adapted)
    save_adapter(adapted, tmp_path / "a")
    tensors = safetensors.torch.load_file(str(tmp_path / "a" / WEIGHTS_FILE))
    assert tensors["qkv.weight[0:16].lora_B"].shape == (16, 2) and tensors["qkv.weight[32:48].lora_A"].shape == (2, 16)
    config = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert config["weights"]["qkv.weight[32:48]"]["role"] == "attn.v"

    rebuilt = adapt_from_adapter(make(cls=FusedAttention), tmp_path / "a", example_inputs=(x,))
    assert sorted(l.rows for l in rebuilt.lora_fx.values()) == [((0, 16),), ((32, 48),)]
    assert torch.equal(rebuilt(x), adapted(x)) and not torch.allclose(rebuilt(x), model(x))
    whole = lora_fx.adapt(make(cls=FusedAttention), [lora_fx.Rule(name="qkv", r=2, alpha=4)], example_inputs=(x,))
    with pytest.raises(AdapterFileError, match=r"missing weights .*\['qkv.weight'\]"):  # a whole-weight LoRA
        load_adapter(whole, tmp_path / "a")
