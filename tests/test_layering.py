"""The core imports no Ray: only progprune.cluster.tasks and the sweep's execution do."""
import subprocess
import sys

CORE = ["progprune.pipeline", "progprune.controls", "progprune.pruning", "progprune.training", "progprune.data",
        "progprune.models", "progprune.artifacts", "progprune.results", "progprune.spec",
        "progprune.storage", "progprune.sweep", "progprune.report", "progprune.cli",
        "progprune.lm.models", "progprune.lm.groups", "progprune.lm.prune", "progprune.lm.text",
        "progprune.lm.count", "progprune.lm.artifact", "progprune.tasks", "progprune.records"]


def test_core_modules_do_not_import_ray():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE) +
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_ray_layer_does():
    code = "import sys, progprune.cluster.tasks; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
