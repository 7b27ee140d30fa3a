"""The order a rank reads a split in: shared by images (loaders.py) and text windows (text.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Reader:
    """Who reads a split: batches of `batch`, in training order (train) or not, under the run's
    `seed`, as rank `rank` of `world`, onto `device`."""
    batch: int
    train: bool
    seed: int = 0
    rank: int = 0
    world: int = 1
    device: object = "cpu"


def epoch_order(n: int, epoch: int, reader: Reader, repeats: int = 1):
    """Indices `reader` sees in this epoch: a seeded permutation (train) or a strided shard (eval).

    With `repeats` > 1 (repeated augmentation, DeiT's RASampler) every index of the permutation
    stands `repeats` times in a row before the list is dealt out rank by rank, so the copies of an
    image go to different ranks (to one rank, in one batch, when world < repeats) and each copy
    gets its own augmentation draw. As in DeiT the epoch keeps the dataset's length: it is cut to
    the same number of samples as without repeats, so an epoch sees about n / repeats distinct
    images and costs the same as before.
    """
    rank, world, batch = reader.rank, reader.world, reader.batch
    if not reader.train:
        return torch.arange(rank, n, world)
    g = torch.Generator().manual_seed(reader.seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if repeats > 1:
        perm = perm.repeat_interleave(repeats)
    usable = (n // (batch * world)) * batch * world
    return perm[:usable][rank::world]
