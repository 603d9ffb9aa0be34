"""ONNX Runtime helpers: honest device selection, input mapping, parity against torch, timing (real ORT, no mocks)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lora_fx.errors import InputError, LoraFxError
from lora_fx.onnx.export import export_onnx
from lora_fx.onnx.runtime import DEFAULT_TOLERANCES, ParityReport, check_parity, ort_session, run_onnx, time_session

HAS_CUDA = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


class GatedMLP(nn.Module):
    """Two tensor inputs, the second by keyword, to exercise the name mapping."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, gate=None):
        return self.fc2(torch.relu(self.fc1(x)) * gate)


X = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
GATE = torch.rand(2, 3, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model() -> GatedMLP:
    torch.manual_seed(0)
    return GatedMLP().eval()


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory, model):
    return export_onnx(model, tmp_path_factory.mktemp("rt") / "gated.onnx", (X,), {"gate": GATE})


@pytest.fixture(scope="module")
def fp16_onnx(tmp_path_factory, model):
    return export_onnx(model, tmp_path_factory.mktemp("rt16") / "gated16.onnx", (X,), {"gate": GATE}, dtype=torch.float16)


@pytest.fixture(scope="module")
def cpu_session(fp32_onnx):
    return ort_session(fp32_onnx, device="cpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU fallback; this machine has CUDA")
def test_auto_falls_back_to_cpu_with_a_warning_that_says_why(fp32_onnx):
    with pytest.warns(RuntimeWarning, match="on CPU: .+") as record:
        session = ort_session(fp32_onnx, device="auto")
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert str(fp32_onnx) in str(record[0].message)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error without CUDA; this machine has CUDA")
def test_cuda_request_without_cuda_raises_with_a_fix(fp32_onnx):
    with pytest.raises(LoraFxError, match="CUDA was requested but is not usable") as info:
        ort_session(fp32_onnx, device="cuda")
    assert 'device="cpu"' in info.value.fix


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_session_runs_on_cuda_and_matches_cpu(fp32_onnx, cpu_session):
    session = ort_session(fp32_onnx, device="cuda")
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(run_onnx(session, (X,), {"gate": GATE})[0], run_onnx(cpu_session, (X,), {"gate": GATE})[0],
                               atol=1e-4, rtol=1e-4)
    assert len(time_session(session, (X, GATE), warmup=1, iters=3)) == 3


def test_cpu_device_gives_a_cpu_session_without_warnings(fp32_onnx):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ort_session(fp32_onnx, device="cpu").get_providers() == ["CPUExecutionProvider"]


def test_bad_device_and_missing_file_raise_input_error(tmp_path, fp32_onnx):
    with pytest.raises(InputError, match="unknown device 'gpu'"):
        ort_session(fp32_onnx, device="gpu")
    with pytest.raises(InputError, match="does not exist"):
        ort_session(tmp_path / "missing.onnx", device="cpu")


def test_run_onnx_maps_keyword_and_positional_inputs(cpu_session, model):
    with torch.no_grad():
        want = model(X, gate=GATE).numpy()
    by_name = run_onnx(cpu_session, (X,), {"gate": GATE})
    by_position = run_onnx(cpu_session, (X.numpy(), GATE.numpy()))
    assert len(by_name) == 1 and by_name[0].shape == (2, 3, 4)
    np.testing.assert_allclose(by_name[0], want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(by_name[0], by_position[0])


def test_run_onnx_with_missing_input_names_what_it_needs(cpu_session):
    with pytest.raises(InputError, match="takes 2") as info:
        run_onnx(cpu_session, (X,))
    assert "gate" in str(info.value)


def test_check_parity_passes_on_a_correct_export(fp32_onnx, model):
    model.train()  # check_parity must evaluate in eval mode and give the flag back
    report = check_parity(fp32_onnx, model, (X,), {"gate": GATE}, device="cpu")
    assert model.training
    model.eval()
    assert isinstance(report, ParityReport)
    assert report.ok and report.provider == "CPUExecutionProvider"
    assert (report.atol, report.rtol) == DEFAULT_TOLERANCES["float32"]
    assert 0 <= report.max_abs_err < 1e-5 and len(report.outputs) == 1
    assert "OK" in str(report) and "CPUExecutionProvider" in str(report)


def test_check_parity_fails_against_perturbed_weights(fp32_onnx, model):
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.fc2.weight.add_(0.05)
    report = check_parity(fp32_onnx, perturbed, (X,), {"gate": GATE}, device="cpu")
    assert not report.ok and not report.outputs[0].ok
    assert report.max_abs_err > report.atol
    assert "FAILED" in str(report)


def test_fp16_export_parity_uses_fp16_tolerances(fp16_onnx, model):
    report = check_parity(fp16_onnx, model, (X,), {"gate": GATE}, device="cpu")  # fp32 inputs are cast to fp16
    assert report.ok, str(report)
    assert (report.atol, report.rtol) == DEFAULT_TOLERANCES["float16"]
    assert report.outputs[0].dtype == "float16/float32"
    assert report.max_abs_err > 0  # really ran in half precision
    strict = check_parity(fp16_onnx, model, (X,), {"gate": GATE}, atol=0.0, rtol=0.0, device="cpu")
    assert not strict.ok and (strict.atol, strict.rtol) == (0.0, 0.0)


def test_check_parity_rejects_a_module_with_other_outputs(fp32_onnx, model):
    class Twice(nn.Module):
        def forward(self, x, gate=None):
            y = model(x, gate=gate)
            return y, y

    with pytest.raises(InputError, match="1 outputs .* 2 tensors"):
        check_parity(fp32_onnx, Twice(), (X,), {"gate": GATE}, device="cpu")


def test_time_session_returns_one_time_per_iteration(cpu_session):
    times = time_session(cpu_session, (X, GATE), warmup=2, iters=5)
    assert len(times) == 5 and all(t > 0 for t in times)
    named = time_session(cpu_session, {"x": X.numpy(), "gate": GATE.numpy()}, warmup=0, iters=1)
    assert len(named) == 1
