"""Pruning by job: `methods` (the registry, and the pruner built for a method), `planner`
(one step planned before it is pruned: the crossing cut and the per-layer cap), `loop`
(the progressive loop), `targets` (a target in latency or parameters, through MACs targets). Torch-Pruning's internals are reached only through `progprune._tp`.
docs/design.md, "The progressive loop", says how the loop differs from Torch-Pruning's."""
from progprune.pruning.loop import (CROSSINGS, MACS_FAST, MACS_TP, ProgressiveLoop,
                                    PruneOutcome, progressive_prune)
from progprune.pruning.methods import (METHODS, Method, get_method, ignored_modules,
                                       list_methods, make_pruner, register_method)
from progprune.pruning.targets import (MetricSearch, Rounds, prune_to_metric, prune_to_target,
                                      replay_history, why_unreachable)
from progprune.pruning.planner import (CROSSING_CUTS, CUT_NONE, CUT_PREFIX, CUT_SUBSET,
                                       CUT_WHOLE)

__all__ = [
    "CROSSINGS", "CROSSING_CUTS", "CUT_NONE", "CUT_PREFIX", "CUT_SUBSET", "CUT_WHOLE",
    "MACS_FAST", "MACS_TP", "METHODS", "Method", "MetricSearch", "ProgressiveLoop", "PruneOutcome",
    "Rounds", "get_method", "prune_to_metric", "prune_to_target", "replay_history", "why_unreachable",
    "ignored_modules", "list_methods", "make_pruner", "progressive_prune", "register_method",
]
