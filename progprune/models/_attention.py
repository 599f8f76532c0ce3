"""Attention layers, pruned the way Torch-Pruning documents for ViTs, and kept consistent.

Torch-Pruning prunes widths; the attribute that says how many heads a layer has is the
model's own, so after every pruning step (and after a pruned model is rebuilt from its
history) it is recomputed from the pruned weights:

* timm's `Attention` (`qkv` Linear, `num_heads`, `head_dim`): whole heads are removed
  (`num_heads={qkv: heads}`, `prune_num_heads=True`, head dims kept), then
  `num_heads = qkv.out_features // (3 * head_dim)` (and `attn_dim`);
* `nn.MultiheadAttention` (torchvision's ViT): its embedding is pruned the same dims in every
  head (`out_channel_groups={mha: heads}`), which Torch-Pruning's own MHA pruner requires; the
  model's `hidden_dim` (torchvision's VisionTransformer reshapes with it) follows `conv_proj`.
"""
from __future__ import annotations

from torch import nn

HEAD_PRUNING_RATIO = 0.5  # at most half the heads over the whole schedule (TP's ViT examples)


def _timm_style(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)
            and isinstance(getattr(m, "head_dim", None), int))


def attention_heads(model: nn.Module) -> tuple[dict, dict]:
    """(num_heads, out_channel_groups) for Torch-Pruning's pruner: {timm qkv Linear: heads}
    and {nn.MultiheadAttention: heads}."""
    heads, groups = {}, {}
    for m in model.modules():
        if _timm_style(m) and m.qkv.out_features == 3 * m.num_heads * m.head_dim:
            heads[m.qkv] = m.num_heads
        elif isinstance(m, nn.MultiheadAttention):
            groups[m] = m.num_heads
    return heads, groups


def sync_attention(model: nn.Module) -> None:
    """Recompute the head counts and hidden sizes the forward pass reads from the pruned
    weights (a no-op for models without attention)."""
    for m in model.modules():
        if _timm_style(m):
            m.num_heads = m.qkv.out_features // (3 * m.head_dim)
            if hasattr(m, "attn_dim"):
                m.attn_dim = m.num_heads * m.head_dim
        if isinstance(getattr(m, "conv_proj", None), nn.Conv2d) and isinstance(getattr(m, "hidden_dim", None), int):
            m.hidden_dim = m.conv_proj.out_channels  # torchvision's VisionTransformer
