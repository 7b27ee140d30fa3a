"""The order a rank reads a split in: shared by images (data.py) and text windows (text_data.py)."""
from __future__ import annotations

import torch


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int, batch: int, train: bool,
                repeats: int = 1):
    """Indices this rank sees in this epoch: a seeded permutation (train) or a strided shard (eval).

    With `repeats` > 1 (repeated augmentation, DeiT's RASampler) every index of the permutation
    stands `repeats` times in a row before the list is dealt out rank by rank, so the copies of an
    image go to different ranks (to one rank, in one batch, when world < repeats) and each copy
    gets its own augmentation draw. As in DeiT the epoch keeps the dataset's length: it is cut to
    the same number of samples as without repeats, so an epoch sees about n / repeats distinct
    images and costs the same as before.
    """
    if not train:
        return torch.arange(rank, n, world)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if repeats > 1:
        perm = perm.repeat_interleave(repeats)
    usable = (n // (batch * world)) * batch * world
    return perm[:usable][rank::world]
