"""The runtimes a model is timed in (`evaluation.runtime`, --runtime): what will serve it.

    rt = get_runtime("onnxruntime")
    rt.check(device, "fp32")                 # BadInput (one line) if it cannot run there
    run = rt.prepare(model, example, device, "fp32", threads=4)
    run(x)                                   # one forward; returns when the result is ready

`check` runs up front (spec load, the CLI, each task before it prunes) so that nothing runs
before a runtime that cannot run is refused. `prepare` leaves the model as it is (eval mode,
same weights): a precision other than fp32 runs a converted copy. Each prepared callable
synchronises the device itself, so a wall clock around it times what a caller waits for.

  eager        the model's own forward (torch)
  compile      torch.compile (inductor), compiled once per model in `prepare`
  onnxruntime  the ONNX export `progprune export` writes (progprune.export.onnx_bytes), run by
               an InferenceSession: CPUExecutionProvider, CUDAExecutionProvider on a GPU
  tensorrt     torch_tensorrt (only where it is installed; a CUDA device)
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
import torch.nn as nn

from progprune.errors import BadInput, CombinationFailed, one_line
from progprune.registry import Registry

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Prepared = Callable[[torch.Tensor], object]


class RuntimeFailed(CombinationFailed):
    """A runtime that passed `check` could not run this model (an operation it does not
    support): the combination fails, its row says why."""


def _kind(device) -> str | None:
    return None if device is None else torch.device(device).type


def _syncer(device) -> Callable[[], None]:
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _in_precision(model: nn.Module, device, precision: str) -> nn.Module:
    """The model itself for fp32 (already on `device`), else a converted copy."""
    if precision == "fp32":
        return model
    return copy.deepcopy(model).to(device=torch.device(device), dtype=DTYPES[precision]).eval()


class Runtime:
    """One runtime. `check(device, precision)`: device None checks what does not depend on
    the device (the package installed, the precision this runtime supports)."""

    name = ""
    doc = ""
    precisions = tuple(DTYPES)

    def check(self, device, precision: str) -> None:
        if precision not in DTYPES:
            raise BadInput(f"unknown precision {precision!r}; valid: {', '.join(DTYPES)}",
                           field="evaluation.precision")
        if precision not in self.precisions:
            raise BadInput(f"runtime {self.name} does not run {precision}; use "
                           f"{' or '.join(self.precisions)}", field="evaluation.precision")
        if precision != "fp32" and _kind(device) == "cpu":
            raise BadInput(f"precision {precision} is timed on a GPU, and this runs on the CPU; use "
                           "precision fp32 (or a CUDA device)", field="evaluation.precision")

    def prepare(self, model: nn.Module, example: torch.Tensor, device, precision: str,
                threads: int | None) -> Prepared:
        raise NotImplementedError


RUNTIMES: Registry[Runtime] = Registry("runtime", field="evaluation.runtime")


def get_runtime(name: str) -> Runtime:
    return RUNTIMES.get(name)


def runtime_names() -> list[str]:
    return RUNTIMES.names()


# The channel multiple a latency target prunes to when the spec sets no `pruning.round_to`
# (benchmarks/bench_round_to.py, README "Targets"): on this CPU at 2x MACs, onnxruntime runs
# odd widths far slower (mobilenetv2 0.52x with none, 1.71x with 16; resnet56 1.09x -> 1.92x)
# and eager gains a little from 8 (resnet56 1.38x -> 1.43x, batch 64 1.63x -> 1.69x); on a
# GPU 8 is the tensor cores' multiple for fp16/bf16 (not measured here: no GPU).
LATENCY_ROUND_TO = {("cpu", "onnxruntime"): 16}
LATENCY_ROUND_TO_DEFAULT = 8


def latency_round_to(runtime: str, device) -> int:
    """The channel multiple a latency target in `runtime` on `device` prunes to by default."""
    return LATENCY_ROUND_TO.get((torch.device(device).type, runtime), LATENCY_ROUND_TO_DEFAULT)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to `threads` inside (None: left as they are); yields the
    count in effect, which the runtimes get and the latency record names."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if threads is not None:
            torch.set_num_threads(before)


def _failed(runtime: str, e: Exception) -> RuntimeFailed:
    return RuntimeFailed(f"runtime {runtime} could not run the model: {one_line(e, with_type=True)}")


# ---- the runtimes ------------------------------------------------------------------------
class Eager(Runtime):
    name, doc = "eager", "the model's own forward in torch"

    def prepare(self, model, example, device, precision, threads):
        net, dtype, sync = _in_precision(model, device, precision), DTYPES[precision], _syncer(device)

        def run(x):
            with torch.no_grad():
                out = net(x.to(dtype))
            sync()
            return out

        return run


class Compile(Runtime):
    name, doc = "compile", "torch.compile (inductor), compiled once per model"

    def prepare(self, model, example, device, precision, threads):
        net, dtype, sync = _in_precision(model, device, precision), DTYPES[precision], _syncer(device)
        compiled = torch.compile(net, dynamic=False)

        def run(x):
            with torch.no_grad():
                out = compiled(x.to(dtype))
            sync()
            return out

        try:  # compiles now: a model inductor cannot compile fails here, not mid-timing
            run(example)
        except Exception as e:  # broad on purpose: inductor raises many types for one meaning
            raise _failed(self.name, e) from None
        return run


class OnnxRuntime(Runtime):
    name, doc = "onnxruntime", "ONNX Runtime on the exported graph (CPU, or its CUDA provider on a GPU)"
    precisions = ("fp32", "fp16")

    def check(self, device, precision):
        from progprune.export import need

        need("onnx", "runtime onnxruntime")
        ort = need("onnxruntime", "runtime onnxruntime")
        super().check(device, precision)
        if _kind(device) == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BadInput("runtime onnxruntime on a GPU needs its CUDAExecutionProvider, which this "
                           "onnxruntime lacks: pip install onnxruntime-gpu (in place of onnxruntime)",
                           field="evaluation.runtime")

    def prepare(self, model, example, device, precision, threads):
        import numpy as np
        import onnxruntime as ort

        from progprune.export import INPUT, OUTPUT, onnx_bytes

        device = torch.device(device)
        dtype = DTYPES[precision]
        graph = onnx_bytes(_in_precision(model, device, precision), example.to(device, dtype))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 0  # 0: onnxruntime's own default
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only
        cuda = device.type == "cuda"
        try:  # bytes in memory: no file to clean up
            session = ort.InferenceSession(graph, opts, providers=[
                "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"])
        except Exception as e:  # broad on purpose: onnxruntime raises its own types
            raise _failed(self.name, e) from None
        if not cuda:
            return lambda x: session.run(None, {INPUT: x.to(dtype).numpy()})[0]
        binding, index = session.io_binding(), device.index or 0
        np_dtype = np.float16 if precision == "fp16" else np.float32

        def run(x):
            x = x.to(device, dtype).contiguous()
            torch.cuda.synchronize(device)  # x is written before onnxruntime reads it
            binding.bind_input(INPUT, "cuda", index, np_dtype, list(x.shape), x.data_ptr())
            binding.bind_output(OUTPUT, "cuda", index)
            session.run_with_iobinding(binding)  # returns once the outputs are ready
            return binding.get_outputs()[0]

        return run


class TensorRT(Runtime):
    name, doc = "tensorrt", "torch_tensorrt on a CUDA device (where it is installed)"

    def check(self, device, precision):
        try:
            import torch_tensorrt  # noqa: F401
        except ImportError:
            raise BadInput("runtime tensorrt needs the torch_tensorrt package (and TensorRT), which is not "
                           "installed: pip install torch-tensorrt on a CUDA machine, or choose another "
                           "runtime (eager, compile, onnxruntime)", field="evaluation.runtime") from None
        super().check(device, precision)
        if _kind(device) == "cpu":
            raise BadInput("runtime tensorrt runs on a CUDA device, and this runs on the CPU; use "
                           "another runtime (eager, compile, onnxruntime)", field="evaluation.runtime")

    def prepare(self, model, example, device, precision, threads):
        import torch_tensorrt

        net, dtype, sync = _in_precision(model, device, precision), DTYPES[precision], _syncer(device)
        try:
            trt = torch_tensorrt.compile(net, ir="dynamo", inputs=[example.to(device, dtype)],
                                         enabled_precisions={dtype})
        except Exception as e:  # broad on purpose: TensorRT raises many types for one meaning
            raise _failed(self.name, e) from None

        def run(x):
            with torch.no_grad():
                out = trt(x.to(dtype))
            sync()
            return out

        return run


for _rt in (Eager(), Compile(), OnnxRuntime(), TensorRT()):
    RUNTIMES.register(_rt.name, _rt)
