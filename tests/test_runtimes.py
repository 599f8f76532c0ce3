"""progprune.runtimes: each runtime's forward against the model's own, the model left as it
was, the refusals `check` makes up front, and latency measured through a runtime."""
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from progprune.config import RUNTIMES, EvaluationConfig
from progprune.errors import BadInput
from progprune.models import build_model
from progprune.runtimes import get_runtime, runtime_names, torch_threads
from progprune.training import measure_latency_stats

CPU = torch.device("cpu")


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training


def _unchanged(model, before):
    state, training = before
    after = model.state_dict()
    assert model.training == training and set(after) == set(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_the_registry_is_the_schemas_list():
    assert sorted(runtime_names()) == sorted(RUNTIMES)
    assert EvaluationConfig().runtime in runtime_names()
    with pytest.raises(BadInput, match=r"unknown runtime 'onnx_runtime'; did you mean 'onnxruntime'\?") as e:
        get_runtime("onnx_runtime")
    assert e.value.field == "evaluation.runtime"


@pytest.mark.parametrize("name", ["eager", "onnxruntime"])
def test_prepared_forward_matches_the_model_and_leaves_it_alone(name):
    model = build_model("resnet20", 10, (3, 32, 32)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    before = _state(model)
    rt = get_runtime(name)
    rt.check(CPU, "fp32")
    run = rt.prepare(model, x, CPU, "fp32", 1)
    got = torch.as_tensor(np.asarray(run(x)))
    assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-4
    _unchanged(model, before)


def test_compile_runs_the_model():
    model = _small()
    x = torch.randn(2, 3, 8, 8)
    before = _state(model)
    with torch.no_grad():
        want = model(x)
    run = get_runtime("compile").prepare(model, x, CPU, "fp32", 1)
    assert (run(x) - want).abs().max().item() <= 1e-4
    _unchanged(model, before)


@pytest.mark.parametrize("name", ["eager", "compile", "onnxruntime"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_a_cpu_is_refused(name, precision):
    with pytest.raises(BadInput) as e:
        get_runtime(name).check(CPU, precision)
    assert e.value.field == "evaluation.precision" and "\n" not in str(e.value)
    assert precision in str(e.value) and ("CPU" in str(e.value) or "does not run" in str(e.value))


def test_onnxruntime_refuses_bf16_whatever_the_device():
    with pytest.raises(BadInput, match="runtime onnxruntime does not run bf16; use fp32 or fp16"):
        get_runtime("onnxruntime").check(None, "bf16")


def test_onnxruntime_not_installed_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when absent
    with pytest.raises(BadInput) as e:
        get_runtime("onnxruntime").check(CPU, "fp32")
    assert str(e.value) == ("runtime onnxruntime needs the onnxruntime package, which is not installed: "
                            "pip install onnxruntime (or pip install 'progprune[export]')")


def test_tensorrt_is_refused_here_naming_what_to_install_or_the_device():
    try:
        import torch_tensorrt  # noqa: F401
        installed = True
    except ImportError:
        installed = False
    with pytest.raises(BadInput) as e:
        get_runtime("tensorrt").check(CPU, "fp32")
    msg = str(e.value)
    assert "\n" not in msg and e.value.field == "evaluation.runtime"
    assert ("runs on a CUDA device" in msg) if installed else ("pip install torch-tensorrt" in msg)


def test_latency_through_onnxruntime_records_runtime_and_threads():
    a, b = _small(), _small()
    before = _state(a)
    threads = torch.get_num_threads()
    la, lb = measure_latency_stats([a, b], (3, 8, 8), CPU, batch_size=2, warmup=1, repeats=5,
                                   runtime="onnxruntime", threads=1)
    for lat in (la, lb):
        assert (lat.runtime, lat.precision, lat.threads, lat.runs) == ("onnxruntime", "fp32", 1, 5)
        assert lat.median_ms > 0
    assert torch.get_num_threads() == threads  # restored
    _unchanged(a, before)


def test_latency_refuses_what_cannot_run_before_timing():
    with pytest.raises(BadInput, match="precision fp16"):
        measure_latency_stats([_small()], (3, 8, 8), CPU, precision="fp16")


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(None) as n:
        assert n == before
    with torch_threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
