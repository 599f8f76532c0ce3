"""Batches of images held in memory as uint8 tensors, with augmentation as tensor ops, and
the sample order every data set shares (shuffling and sharding across ranks alike)."""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from progprune.errors import BadInput


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, mean, std, shuffle: bool = False,
            augment: bool = False, generator: torch.Generator | None = None, device="cpu",
            rank: int = 0, world_size: int = 1, drop_last: bool = False,
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (normalised float x, int64 y) batches on `device` from uint8 `x`.

    Shuffling draws one permutation from `generator` (a CPU generator): ranks that seed it
    alike agree on it. With `world_size > 1` rank r takes positions r, r+W, ... of that
    permutation, like DistributedSampler: shards are disjoint and equal; the tail is wrapped
    around to pad the last shard (drop_last=False) or trimmed (drop_last=True, which also
    drops an incomplete last batch). Augmentation is a random crop of the image padded by 4
    (reflect; zeros below 5 pixels) and a horizontal flip, drawn per sample from `generator` and applied as batched tensor ops.
    """
    idx = sample_order(len(x), batch_size, shuffle=shuffle, generator=generator, rank=rank,
                       world_size=world_size, drop_last=drop_last)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
    idx = idx.to(x.device)
    for start in range(0, len(idx), batch_size):
        b = idx[start:start + batch_size]
        xb = x[b].to(device, non_blocking=True).float()
        if augment:
            xb = _augment(xb, generator)
        yield (xb - mean_t) / std_t, y[b.to(y.device)].to(device, non_blocking=True)


def sample_order(n: int, batch_size: int, *, shuffle: bool = False, generator=None, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False) -> torch.Tensor:
    """The positions rank `rank` visits in one epoch over `n` samples, in order (see
    `batches`); its length is a multiple of batch_size when drop_last."""
    if batch_size < 1:
        raise BadInput(f"batch_size: must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise BadInput(f"rank: must be in [0, world_size={world_size}), got {rank}")
    idx = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if world_size > 1:
        per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        total = per_rank * world_size
        if total > n:
            idx = idx.repeat(math.ceil(total / n))
        idx = idx[:total][rank::world_size]
    return idx[:(len(idx) // batch_size) * batch_size] if drop_last else idx


def _augment(x: torch.Tensor, generator: torch.Generator | None, pad: int = 4) -> torch.Tensor:
    n, _, h, w = x.shape
    # draw on the CPU generator (reproducible, shared across ranks), then move the few ints
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    mode = "reflect" if min(h, w) > pad else "constant"  # reflect needs pad < side
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = torch.where(flip[:, None], dx[:, None] + torch.arange(w - 1, -1, -1, device=x.device),
                       dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]  # crop and flip in one gather
