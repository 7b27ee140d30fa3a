"""How the trained part meets the ranks (`train.parallel`): DDP replicates it, FSDP2 shards it.

The one place a stage's trained part is wrapped. Under fsdp every block the family names
(`family.block_modules`) is a `fully_shard` unit, then the trained part's root (the whole model, or a
hybrid's module runner); the frozen meta parts of a hybrid stay replicated (docs/performance.md says
why). One process under fsdp shards over a group of one, so that its sharded checkpoints resume at any
number of ranks. The CUDA defaults a timm or torchtitan user expects are here too (`gpu_defaults`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as tdist
from torch import nn

from ..errors import UserError


@dataclass
class Trainee:
    """What a stage trains. `net` maps inputs to logits; `model` is the trained model (its parameters
    reach the optimizer, its state is what checkpoints and the stage's weights hold); `root` is the part
    DDP or FSDP wraps; `put_root` puts a DDP wrapper of it back into `net` (None: the root is `net`)."""
    net: nn.Module
    model: nn.Module
    root: nn.Module
    family: object
    put_root: Optional[Callable[[nn.Module], None]] = None

    @classmethod
    def whole(cls, model: nn.Module, family) -> "Trainee":
        return cls(model, model, model, family)


def check_fsdp(cfg, family, key: str = "train.parallel") -> None:
    """The refusals of `parallel: fsdp` (`key` names it), before anything is written."""
    if cfg.parallel != "fsdp":
        return
    if not hasattr(family, "block_modules"):
        name = getattr(family, "name", type(family).__name__)
        raise UserError(f"{key}: fsdp shards a model block by block, and model.family {name} names no blocks "
                        f"(its adapter has no block_modules); use {key}=ddp for this family")
    if cfg.amp == "fp16":
        raise UserError(f"{key}: fsdp trains with amp bf16 or none, not fp16 (no gradient scaler for sharded "
                        f"gradients here); use --set train.amp=bf16")


def mixed_precision(amp: str):
    """train.amp bf16 -> bf16 parameters and compute, fp32 gradient reduction (torchtitan's default)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if amp == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def join_group_of_one(device: torch.device) -> None:
    """FSDP and torch.distributed.checkpoint need a process group: one process makes its own."""
    if tdist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)


def shard(part: Trainee, amp: str, device: torch.device) -> nn.Module:
    """fully_shard every block of the trained model, then the root; returns the root (an FSDPModule)."""
    from torch.distributed.fsdp import fully_shard
    join_group_of_one(device)
    policy = mixed_precision(amp)
    for block in part.family.block_modules(part.model):
        fully_shard(block, mp_policy=policy, reshard_after_forward=True)
    # the root's parameters are needed again at once by backward: kept gathered (torchtitan does the same)
    fully_shard(part.root, mp_policy=policy, reshard_after_forward=False)
    return part.root


def replicate(part: Trainee, dist) -> nn.Module:
    """DDP around the root, put back where the root was (a hybrid's runner, or the whole net)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP(part.root, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    if part.put_root is None:
        part.net = ddp
    else:
        part.put_root(ddp)
    return ddp


def sharded(net: nn.Module) -> bool:
    """Whether FSDP shards some part of `net` (its forwards are then collectives)."""
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in net.modules())


def reshard(net: nn.Module) -> None:
    """Every FSDP unit back to its shards (a root left gathered by evaluation): before a state dict."""
    from torch.distributed.fsdp import FSDPModule
    for m in net.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_state(model: nn.Module) -> dict:
    """The model's whole state dict: gathered on the CPU on rank 0 when sharded (a collective; the
    other ranks get an empty dict), else its own state dict."""
    if not sharded_params(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sharded_params(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def gpu_defaults(device: torch.device, amp: str, deterministic: bool = False) -> dict:
    """Apply and return the CUDA settings a timm or torchtitan user expects: TF32 matmuls and cuDNN's
    autotuner where the recipe trains in fp32 (bf16/fp16 compute does not use TF32). None off CUDA,
    and none under `deterministic: true` (both change results from run to run or from fp32's)."""
    if device.type != "cuda" or amp != "none" or deterministic:
        return {}
    torch.set_float32_matmul_precision("high")      # TF32 tensor cores for fp32 matmuls
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True            # fixed input shapes: autotune each conv once
    return {"float32_matmul_precision": "high", "cuda.matmul.allow_tf32": True, "cudnn.allow_tf32": True,
            "cudnn.benchmark": True}
