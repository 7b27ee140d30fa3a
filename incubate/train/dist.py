"""The process group: joining it under torchrun (gloo on CPU, nccl on GPU), meeting, leaving."""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from ..errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("recipe asks for device: cuda but no CUDA device is visible; use device: auto or cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        _init_process_group("nccl" if use_cuda else "gloo", rank, world)
    return Dist(rank, world, local, dev)


def _init_process_group(backend: str, rank: int, world: int) -> None:
    """init_process_group; on one node under torchrun's agent store, keys prefixed by the restart
    count, so that a restarted group never reads the addresses its dead predecessor published."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("GROUP_WORLD_SIZE") == "1":
        from torch.distributed.constants import default_pg_timeout
        store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None, False,
                               timeout=default_pg_timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        tdist.init_process_group(backend, store=tdist.PrefixStore(f"incubate/attempt_{attempt}", store),
                                 rank=rank, world_size=world)
    else:
        tdist.init_process_group(backend)


def close_dist(ok: bool) -> None:
    """Leave the process group before the interpreter exits: gloo's threads left to teardown can abort
    a finished process. After success the ranks meet first; after a failure (already agreed on) a gloo
    group is left locally, an NCCL one to torchrun (its destroy is collective)."""
    if not tdist.is_available() or not tdist.is_initialized():
        return
    if ok:
        try:
            tdist.barrier()
        except RuntimeError:        # a peer already gone: nothing left to wait for
            pass
    elif tdist.get_backend() != "gloo":
        return
    gc.collect()        # a failure's frame <-> traceback cycle holds the DDP model, and through it the group
    tdist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.world > 1 and tdist.is_initialized():
        tdist.barrier()
