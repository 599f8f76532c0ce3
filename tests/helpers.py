"""Helpers shared by the end-to-end test files (no test file imports another). Fixtures
live in conftest.py; what one file alone uses stays in that file."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import traceback
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from progprune.results import COLUMNS
from raycluster import BIN

ROOT = Path(__file__).resolve().parents[1]


def run_env(**extra) -> dict:
    """This environment with the venv's bin/ first on PATH and no RAY_ADDRESS. Ray's task
    workers run at nice 0 rather than Ray's default 15: on a shared test machine a niced
    worker gives way to every other process, which doubled the Ray tests' time under load."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_worker_niceness": "0", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def progprune(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
    """The real `progprune` command in a process of its own."""
    return subprocess.run([str(BIN / "progprune"), *map(str, args)], capture_output=True, text=True,
                          env=env or run_env(), timeout=timeout, cwd=ROOT)


def progprune_in_process(*args) -> subprocess.CompletedProcess:
    """The real `progprune` click group (its error mapping included) run in this process
    through Click's CliRunner: no torch/Ray import per call. For bad input that fails
    before any work; each family keeps at least one real-process run (`progprune`), which
    is what proves the exit code and the absence of a traceback in a real process. An
    exception the CLI let through is appended to stderr as its traceback, so
    `"Traceback" not in r.stderr` keeps its teeth here too."""
    from click.testing import CliRunner

    from progprune.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    err = res.stderr
    if res.exc_info is not None and not isinstance(res.exception, SystemExit):
        err += "".join(traceback.format_exception(*res.exc_info))
    return subprocess.CompletedProcess(["progprune", *map(str, args)], res.exit_code, res.stdout, err)


def tiny_spec(tmp_path: Path, name="tiny", **over) -> Path:
    """A small synthetic grid: 2 models x 2 speedups, fine-tuned in-task (num_workers 0)."""
    spec = {
        "name": name,
        "dataset": {"name": "synthetic", "num_classes": 4, "synthetic_samples": 96},
        "models": ["resnet20", "vgg11"],
        "speedups": [1.5, 2.0],
        "base_training": {"epochs": 1, "batch_size": 32, "augment": False},
        "finetune": {"epochs": 1, "batch_size": 32, "augment": False, "num_workers": 0},
        "pruning": {"iterative_steps": 60},
        "evaluation": {"latency_repeats": 2},
        "resources": {"max_concurrent": 2},
        "output": str(tmp_path / "out"),
    }
    for k, v in over.items():
        spec[k] = v
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def read_results(out: Path) -> pd.DataFrame:
    """A sweep's results.parquet, checked to hold every column."""
    table = pq.read_table(out / "results.parquet")
    assert set(COLUMNS) <= set(table.column_names)
    return table.to_pandas()


def combo_ids(spec: Path) -> list[str]:
    from progprune.spec import load_spec

    return sorted(c.combo_id() for c in load_spec(spec).combinations())


def one_row_each(out: Path, spec: Path) -> pd.DataFrame:
    df = read_results(out)
    assert sorted(df.combo_id) == combo_ids(spec), df[["combo_id", "status"]]  # one each, no dupes
    return df


# ---- sweeps as background processes (faults, probes) ------------------------------------
def popen_sweep(*args, env=None) -> subprocess.Popen:
    # its own session: we can kill it, and everything it started, without touching others
    return subprocess.Popen([str(BIN / "progprune"), "sweep", *map(str, args)], cwd=ROOT,
                            env=env or run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for(cond, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"sweep exited ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-2000:]}")
        if time.monotonic() > deadline:
            kill_session(proc)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def session_pids(sid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process we started and every process in its session (an embedded Ray's
    GCS, raylet, agents and workers), then reap it so its pid is really gone."""
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=60)


def spread_bn_model(name: str, num_classes: int = 10, seed: int = 0):
    """A seeded model with BN scales spread out as training leaves them (so that magnitude
    rankings are not ties)."""
    import torch
    import torch.nn as nn

    from progprune.models import build_model
    torch.manual_seed(seed)
    model = build_model(name, num_classes).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
    return model


# ---- causal LMs (tests/test_lm.py): real English text and tiny random transformers ------
def write_pydoc_corpus(folder, val_fraction: float = 0.1):
    """train.txt / val.txt from the documentation topics that ship with Python itself."""
    from pathlib import Path
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    cut = int(len(text) * (1 - val_fraction))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text(text[:cut], encoding="utf-8")
    (folder / "val.txt").write_text(text[cut:], encoding="utf-8")
    return folder


def tiny_causal_lm(family: str, vocab_size: int, seed: int = 0):
    """A randomly initialised 2-layer transformers model of `family` (llama; qwen2, qwen3 and
    mistral with grouped-query attention: 4 heads on 2 KV heads; gpt2), built from its config."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, num_hidden_layers=2, hidden_size=64,
                  num_attention_heads=4, intermediate_size=256, max_position_embeddings=128)
    if family == "llama":
        cfg = LlamaConfig(num_key_value_heads=4, **common)
    elif family == "qwen2":
        cfg = Qwen2Config(num_key_value_heads=2, **common)
    elif family == "qwen3":  # q/k norms per head, grouped-query attention
        cfg = Qwen3Config(num_key_value_heads=2, head_dim=16, **common)
    elif family == "mistral":
        cfg = MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_layer=2, n_embd=64, n_head=4, n_inner=512,
                         n_positions=128, bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(family)
    return AutoModelForCausalLM.from_config(cfg).eval()
