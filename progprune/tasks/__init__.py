"""Tasks: what is pruned and how it is measured (`image_classification`, the default, and
`causal_lm`). See `progprune.tasks._registry` for the seam."""
from progprune.tasks._registry import TASKS, Task, get_task, needs_sparse, task_of
from progprune.tasks import image, causal_lm  # noqa: E402,F401 (fill TASKS)

__all__ = ["TASKS", "Task", "get_task", "needs_sparse", "task_of"]
