"""Bad inputs, untrusted files: files from other people: bounded time and memory, honest saves.

What each case checks: tests/bad_inputs.py.
"""

from __future__ import annotations

import errno
import json
import os

import pytest
import safetensors.torch
import torch
from torch import nn

import lora_fx
from lora_fx import Rule

from bad_inputs import disk_full, state, assert_unchanged, files, expect
from conftest import TinyMLP, state_of, deadline


# Rules files, adapter folders and ONNX files come from other people: bounded time and memory, honest saves.
# overlapping alternatives under a star: re and the regex package both backtrack exponentially on long names
SLOW = r"(?:[a-z_.0-9]|[a-z_.0-9])*[A-Z]"


class LongNames(nn.Module):
    """Module names long enough (40 characters) for a backtracking regex to run for years."""

    def __init__(self):
        super().__init__()
        self.projection_of_the_input_to_hidden_units = nn.Linear(8, 8)

    def forward(self, x):
        return self.projection_of_the_input_to_hidden_units(x)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_a_rules_file_regex_that_backtracks_is_refused_in_bounded_time(tmp_path, suffix):
    path = tmp_path / f"lora{suffix}"
    path.write_text(f"[[rule]]\nname = {json.dumps(SLOW)}\n" if suffix == ".toml" else
                    json.dumps({"rules": [{"name": SLOW}]}))
    from lora_fx.rules_file import load_rules

    rules, _ = load_rules(path)  # a valid regex: what it costs shows only when it meets long names
    model = LongNames()
    before = state(model)
    with deadline(30):
        expect(lora_fx.RuleError, lambda: lora_fx.plan(model, rules, example_inputs=(torch.randn(2, 8),)),
               "`name`", "backtracks", str(path), "rule 0")
    assert_unchanged(model, before)


def test_the_issue_regex_finishes_in_bounded_time():
    """(.|.)*Z doubles re's time per character: on these 40-character names `re` would run for days."""
    model, x = LongNames(), torch.randn(2, 8)
    with deadline(30):
        expect(lora_fx.NoSitesError, lambda: lora_fx.adapt(model, [Rule(name="(.|.)*Z")], example_inputs=(x,)),
               "no rule matched")


@pytest.mark.parametrize("name", ["(?i)q", "(", "a)|(b"])
def test_a_rule_name_that_is_no_regex_as_matched_is_refused_when_made(name):
    """(?i) inside the group the name is matched in is an re.error at match time: refused when the Rule is made."""
    expect(lora_fx.RuleError, lambda: Rule(name=name), "`name` is not a valid regex")


def test_a_huge_layer_span_stays_a_range(tmp_path):
    import tracemalloc

    from lora_fx.rules_file import dump_rules, load_rules

    path = tmp_path / "r.toml"
    # a million layers first: expanding it would take ~60 MB, and fails here instead of exhausting the memory below
    for span in ("0:1000000", "0:10000000000"):
        path.write_text(f'[[rule]]\nlayers = "{span}"\n')  # 36 bytes for the second
        tracemalloc.start()
        try:
            (rule,), _ = load_rules(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1_000_000, f"loading layers = {span!r} took {peak} bytes"
    assert rule.describe() == "Rule(layers='0:10000000000')" and rule.to_dict() == {"layers": "0:10000000000"}
    assert hash(rule) == hash(Rule(layers=range(0, 10_000_000_000)))
    # the span selects by membership: a site in layer 3 is in, one outside any layer (None) is not
    from lora_fx.rules import _in_layers

    assert _in_layers(3, rule.layers) and _in_layers(9_999_999_999, rule.layers)
    assert not _in_layers(10_000_000_000, rule.layers) and not _in_layers(None, rule.layers)
    again, _ = load_rules(dump_rules([rule, Rule(layers=[7, "2:4", 0])], tmp_path / "again.json"))
    assert again == [rule, Rule(layers=[0, range(2, 4), 7])]


def test_a_huge_layer_span_selects_layers_in_a_real_plan():
    from tests.test_rules import SelNet  # three layers

    plan = lora_fx.plan(SelNet(), [Rule(layers="1:1000000", r=2)], example_inputs=(torch.randn(2, 5, 16),),
                        frontend="fx")
    layers = {d.site.layer for d in plan.adapted}
    assert layers == {1, 2}, layers


@pytest.mark.parametrize("suffix, text", [
    (".json", '{"rules": [{"name": ' + "[" * 100_000 + "]" * 100_000 + "}]}"),
    (".toml", "x = " + "[" * 5_000 + "]" * 5_000 + "\n"),
])
def test_a_deeply_nested_rules_file(tmp_path, suffix, text):
    from lora_fx.rules_file import load_rules

    path = tmp_path / f"deep{suffix}"
    path.write_text(text)
    expect(lora_fx.RuleError, lambda: load_rules(path), "too deeply", str(path))


def test_a_deeply_nested_adapter_config(adapted, saved, tmp_path):
    (saved[0] / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    on_disk, before = files(tmp_path), state(adapted)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.load_adapter(adapted, saved[0]), "too deeply",
           "adapter_config.json")
    assert_unchanged(adapted, before)
    assert files(tmp_path) == on_disk


@pytest.fixture
def fp16_overflowing():
    """A float16 TinyMLP whose fc2 LoRA pushes one weight past float16's 65504 (fc1's LoRA folds fine, and comes
    first: an in-place fold that wrote as it went would have changed fc1 before finding fc2)."""
    torch.manual_seed(0)
    model = TinyMLP().half().eval()
    adapted = lora_fx.adapt(model, example_inputs=(torch.randn(4, 8).half(),), r=4, alpha=8)
    with torch.no_grad():
        model.fc2.weight[0, 0] = 60000.0
        adapted.lora_fx["fc1"].lora_B.normal_(0, 0.1)
        adapted.lora_fx["fc2"].lora_A.fill_(1.0)
        adapted.lora_fx["fc2"].lora_B[0, :] = 1000.0  # delta[0, :] = (8/4) · 4 · 1000 = 8000: 68000 > 65504
    return model, adapted


@pytest.mark.parametrize("call", ["fold", "fold_inplace", "merge"])
def test_fold_refuses_a_weight_that_overflows_its_dtype(fp16_overflowing, call):
    model, adapted = fp16_overflowing
    before, before_model = state(adapted), state(model)
    fn = {"fold": lambda: lora_fx.fold(adapted), "fold_inplace": lambda: lora_fx.fold(adapted, inplace=True),
          "merge": lambda: lora_fx.merge_adapter(adapted)}[call]
    expect(lora_fx.FoldError, fn, "fc2.weight", "float16", "NaN or Inf", "nothing was folded", "float32 or bfloat16 copy")
    assert_unchanged(adapted, before)
    assert_unchanged(model, before_model)
    assert state_of(adapted).merged == []


def test_fold_of_a_weight_near_the_limit_that_fits_still_works(fp16_overflowing):
    model, adapted = fp16_overflowing
    with torch.no_grad():
        adapted.lora_fx["fc2"].lora_B[0, :] = 500.0  # 60000 + 4000 = 64000 < 65504
    merged = lora_fx.fold(adapted)
    assert torch.isfinite(merged.get_parameter("fc2.weight")).all()
    assert float(merged.get_parameter("fc2.weight")[0, 0]) == 64000.0


def _bump(adapted) -> None:
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_A.add_(1.0)  # a new save differs from the files on disk


def test_save_into_a_symlinked_folder_writes_where_the_link_points(adapted, saved, tmp_path):
    """The link is followed (documented in save_adapter): the folder it points to gets the new adapter, the link
    stays a link, and no temporary folder is left beside either."""
    link = tmp_path / "latest"
    link.symlink_to(saved[0], target_is_directory=True)
    _bump(adapted)
    assert lora_fx.save_adapter(adapted, link) == link
    assert link.is_symlink() and os.readlink(link) == str(saved[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "latest"]
    assert sorted(p.name for p in saved[0].iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    on_disk = safetensors.torch.load_file(str(saved[0] / "adapter.safetensors"))
    assert torch.equal(on_disk["fc1.weight.lora_A"], adapted.lora_fx["fc1"].lora_A.detach())


def test_save_into_a_link_to_nothing(adapted, tmp_path):
    (tmp_path / "latest").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    on_disk = files(tmp_path)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.save_adapter(adapted, tmp_path / "latest"), "symbolic link",
           "does not exist", "latest")
    assert files(tmp_path) == on_disk and (tmp_path / "latest").is_symlink()


def test_a_save_whose_old_copy_cannot_be_removed_has_succeeded(adapted, saved, tmp_path, monkeypatch):
    """After the swap the new adapter is in place: a failure to delete the old copy is a warning that names it,
    never an error claiming that nothing changed."""
    import shutil

    import lora_fx.atomic as af

    real_rmtree = shutil.rmtree

    def stuck(path, ignore_errors=False, **kwargs):
        if ignore_errors:
            return real_rmtree(path, ignore_errors=True, **kwargs)
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    _bump(adapted)
    monkeypatch.setattr(af.shutil, "rmtree", stuck)
    with pytest.warns(UserWarning, match="could not be removed") as warned:
        lora_fx.save_adapter(adapted, saved[0])
    monkeypatch.undo()
    on_disk = safetensors.torch.load_file(str(saved[0] / "adapter.safetensors"))
    assert torch.equal(on_disk["fc1.weight.lora_A"], adapted.lora_fx["fc1"].lora_A.detach())
    leftover = [p for p in tmp_path.iterdir() if p.name != "adapter"]
    assert len(leftover) == 1 and str(leftover[0]) in str(warned[0].message)


_UNPRIVILEGED_SAVE = r"""
import json, os, shutil, sys, tempfile
import torch
from torch import nn
import lora_fx

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

torch.manual_seed(0)
adapted = lora_fx.adapt(MLP().eval(), example_inputs=(torch.randn(2, 8),), r=2)
warm = tempfile.mkdtemp()
lora_fx.save_adapter(adapted, os.path.join(warm, "adapter"))  # loads what a save imports while still root (the
shutil.rmtree(warm)                                           # interpreter may live where nobody can read)
root = tempfile.mkdtemp()
if os.geteuid() == 0:  # permissions bind only an unprivileged user
    os.chown(root, 65534, 65534)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)

def snapshot():
    out = {}
    for folder, dirs, names in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root)] = "<dir>"
        for n in names:
            with open(os.path.join(folder, n), "rb") as f:
                out[os.path.relpath(os.path.join(folder, n), root)] = f.read().hex()
    return out

results = {}
for case in ("read-only parent", "read-only folder"):
    parent = os.path.join(root, case.replace(" ", "_"))
    target = os.path.join(parent, "adapter")
    os.mkdir(parent)
    lora_fx.save_adapter(adapted, target)
    with torch.no_grad():
        for lora in adapted.lora_fx.values():
            lora.lora_A.add_(1.0)
    locked = parent if case == "read-only parent" else target
    os.chmod(locked, 0o555)
    before = snapshot()
    try:
        lora_fx.save_adapter(adapted, target)
        results[case] = "saved"
    except lora_fx.AdapterFileError as e:
        results[case] = str(e)
    results[case + ": unchanged"] = snapshot() == before
    os.chmod(locked, 0o755)
shutil.rmtree(root)
print(json.dumps(results))
"""


def test_a_read_only_parent_or_folder_fails_before_anything_changes():
    """Real permissions, so as an unprivileged user (root ignores them): a subprocess that drops root to `nobody`
    once it has loaded what it needs."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TMPDIR": "/tmp"}
    done = subprocess.run([sys.executable, "-c", _UNPRIVILEGED_SAVE], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for case in ("read-only parent", "read-only folder"):
        assert "not writable" in results[case] and "nothing was changed" in results[case], results
        assert "How to fix:" in results[case]
        assert results[case + ": unchanged"], results


def test_a_failed_save_removes_the_parent_folders_it_created(adapted, tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    expect(lora_fx.AdapterFileError, lambda: lora_fx.save_adapter(adapted, tmp_path / "runs" / "7" / "adapter"),
           "saving failed", "No space left")
    monkeypatch.undo()
    assert files(tmp_path) == {}


def test_fold_of_a_float32_adapter_that_diverged_says_so():
    """In float32 nothing a LoRA adds overflows the dtype's range short of divergence: the fix is the adapter, not a
    wider copy of the model."""
    torch.manual_seed(0)
    adapted = lora_fx.adapt(TinyMLP().eval(), example_inputs=(torch.randn(4, 8),), r=4)
    with torch.no_grad():
        adapted.lora_fx["fc1"].lora_A.fill_(1e20)  # finite, but B·A = 4e40 is past float32's 3.4e38
        adapted.lora_fx["fc1"].lora_B.fill_(1e20)
    message = expect(lora_fx.FoldError, lambda: lora_fx.fold(adapted), "fc1.weight", "float32", "diverged")
    assert "float32 or bfloat16 copy" not in message
