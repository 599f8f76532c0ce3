"""progprune: FLOPs-targeted progressive structured pruning, run at scale on Ray."""
__version__ = "0.1.0"

from progprune.errors import ProgpruneError, SpecError  # noqa: E402

__all__ = ["__version__", "ProgpruneError", "SpecError"]
