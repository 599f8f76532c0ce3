"""Causal language models (Hugging Face transformers): load `hf:PATH`, declare the
prunable groups (attention heads by KV group, MLP channels, the hidden size, decoder layers),
prune them progressively to a params or MACs-per-token target with Torch-Pruning's low-level
pruning functions, keep the config in step so the model reloads in transformers, save it as
one file (artifact.py) and measure perplexity. Needs the `llm` extra.

Why declared groups rather than Torch-Pruning's dependency graph: docs/design.md,
"Language models".
"""
