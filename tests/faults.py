"""Test-only fault injection for sweeps on a real Ray cluster; progprune does not know it.

    r = progprune("sweep", spec, "--address", addr, env=_env(**inject("kill:prune:vgg11:2.0", markers)))

`inject` returns the environment that hands the sweep's driver a job runtime env, the way
`ray job submit` hands a job its own (RAY_JOB_CONFIG_JSON_ENV_VAR): this directory on every
worker's PYTHONPATH and Ray's `worker_process_setup_hook` set to `install`, so every worker
process of the job (tasks and Ray Train workers alike) wraps progprune's stage functions:

- raise:STAGE:MODEL:SPEEDUP   raises in that stage (prune or finetune) of that combination;
- kill:prune:MODEL:SPEEDUP    SIGKILLs the prune task's worker process once (Ray retries);
- hold:prune:MODEL:SPEEDUP    waits in that prune until `<markers>/release` exists (at most
  300 s), so a test can look at a running sweep however fast its machine is;
- kill:finetune:MODEL:SPEEDUP SIGKILLs the Ray Train worker once, right after its report of
  epoch 1 (0-based) returns: a Train worker's result queue holds one report, so that
  report returns only once the controller has taken epoch 0's, checkpoint included, and
  the restart resumes from a registered checkpoint (epoch 0's, or epoch 1's if the
  controller took that one too before it saw the worker die).

Each kill leaves a marker file `<combo_id>-<stage>` in `markers`: it happens once, and a
test can see that it did.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def inject(faults: str, markers: Path) -> dict:
    """Environment entries for the driver of a sweep that should meet `faults`."""
    # this directory first, then the PYTHONPATH the driver has (a checkout's progprune over an
    # installed one): the job's env_vars replace the workers' PYTHONPATH
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"worker_process_setup_hook": "faults.install",
                   "env_vars": {"PYTHONPATH": path, "FAULTS": faults, "FAULT_MARKERS": str(markers)}}
    return {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": runtime_env})}


def _matches(cfg, stage: str) -> list[str]:
    kinds = []
    for item in os.environ.get("FAULTS", "").split(","):
        kind, st, model, speedup = (item.split(":") + ["", "", "", ""])[:4]
        if st == stage and model == cfg.model and float(speedup or 0) == float(cfg.target_speedup):
            kinds.append(kind)
    return kinds


def _strike(kind: str, stage: str, cfg) -> None:
    if kind == "hold":
        release = Path(os.environ["FAULT_MARKERS"]) / "release"
        release.parent.mkdir(parents=True, exist_ok=True)
        (release.parent / "held").write_text(cfg.combo_id())  # a test can see it held
        deadline = time.monotonic() + 300
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return
    if kind == "raise":
        raise RuntimeError(f"injected failure in {stage} of {cfg.model}@{cfg.target_speedup}x")
    marker = Path(os.environ["FAULT_MARKERS"]) / f"{cfg.combo_id()}-{stage}"
    if kind == "kill" and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    """Ray's worker setup hook: wrap the stages named in $FAULTS in this worker process."""
    if not os.environ.get("FAULTS"):
        return
    from progprune.tasks import image  # the image task's stages, which its Task methods look up at call time

    prune_stage, finetune_stage = image.prune_stage, image.finetune_stage

    def faulty_prune(cfg, *args, **kwargs):
        for kind in _matches(cfg, "prune"):
            _strike(kind, "prune", cfg)
        return prune_stage(cfg, *args, **kwargs)

    def faulty_finetune(cfg, *args, on_epoch=None, **kwargs):
        kinds = _matches(cfg, "finetune")
        if "raise" in kinds:
            _strike("raise", "finetune", cfg)

        def epoch_done(metrics, state):
            if on_epoch:
                on_epoch(metrics, state)  # Ray Train's report
            if metrics["epoch"] == 1 and "kill" in kinds:
                _strike("kill", "finetune", cfg)

        return finetune_stage(cfg, *args, on_epoch=epoch_done, **kwargs)

    image.prune_stage, image.finetune_stage = faulty_prune, faulty_finetune
