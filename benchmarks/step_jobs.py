"""The jobs benchmarks/step_cost.py and benchmarks/data_wait.py time: E2E, the meta model, each
hybrid(i) (ours, or with the official semantics), built from a preset, and one training step of each."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from incubate.train.step import autocast, enable_grad_checkpointing
from incubate.families import get_family
from incubate.modular import Hybrid

FAMILY = get_family("vit")
PRESETS = {   # timm name, overrides, target depth, K, batch, classes, image size
    "tiny": dict(name="vit_tiny_patch16_224", kwargs=dict(patch_size=4, embed_dim=192, num_heads=3),
                 depth=12, k=4, batch=64, classes=100, img=32),
    "vit_b16": dict(name="vit_base_patch16_224", kwargs={}, depth=12, k=4, batch=64, classes=1000, img=224),
    "vit_l16": dict(name="vit_large_patch16_224", kwargs={}, depth=24, k=4, batch=64, classes=1000, img=224),
    # the paper's DeiT-T-32 shape (CIFAR-100 table) at 32 px
    "deit_t32": dict(name="vit_tiny_patch16_224", kwargs=dict(patch_size=4, embed_dim=192, num_heads=3),
                     depth=32, k=4, batch=64, classes=100, img=32),
    # seconds on a CPU: what benchmarks/gpu_run.sh --smoke runs
    "smoke": dict(name="vit_tiny_patch16_224", kwargs=dict(patch_size=4, embed_dim=16, num_heads=2),
                  depth=8, k=4, batch=4, classes=10, img=8),
}
CRITERION = nn.CrossEntropyLoss(label_smoothing=0.1)


@dataclass
class Job:
    name: str                  # e2e | meta | hybrid<i> | official<i> | matmul
    variant: str
    net: nn.Module | None = None
    trained: nn.Module | None = None
    opt: object = None
    amp: str = "none"
    run: object = None
    times: list = field(default_factory=list)
    flops: int = 0
    memory: dict = field(default_factory=dict)
    compile_s: float | None = None
    cuda_growth: int = 0
    scaler: object = None      # fp16 only, as the engine does

    @property
    def key(self) -> str:
        return self.name if self.variant == "base" else f"{self.name}+{self.variant}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(p: dict, depth: int, device, seed: int = 0) -> nn.Module:
    """Built (and initialised) on the device: ViT-L's CPU initialisation would eat the GPU check's time."""
    torch.manual_seed(seed)
    import timm
    with torch.device(device):
        return timm.create_model(p["name"], pretrained=False, depth=depth, num_classes=p["classes"], in_chans=3,
                                 img_size=p["img"], **p["kwargs"])


def make_job(name: str, variant: str, p: dict, amp: str, device, backend: str = "inductor") -> Job:
    from timm.optim import create_optimizer_v2
    k, depth = p["k"], p["depth"]
    division = [depth // k] * k
    if name == "e2e" or name == "meta":
        net = build_model(p, depth if name == "e2e" else k, device)
        trained = net
    else:
        index = int(name[-1])
        target = FAMILY.keep_only(build_model(p, depth, device), division, index)
        net = Hybrid(FAMILY, build_model(p, k, device, seed=1), [1] * k, target, division, index,
                     frozen_suffix_grads=name.startswith("hybrid"))
        trained = target
    net.to(device).train()
    if variant == "ckpt":
        enable_grad_checkpointing(net, trained)
    opt = create_optimizer_v2(trained, opt="adamw", lr=1e-4, weight_decay=0.05,
                              **({"fused": True} if variant == "fused" else {}))
    job = Job(name, variant, net, trained, opt, "bf16" if variant == "bf16" else amp)
    if job.amp == "fp16":
        job.scaler = torch.amp.GradScaler("cuda")
    job.run = torch.compile(net, backend=backend) if variant == "compile" else net
    return job


def step(job: Job, x, y, device) -> None:
    with autocast(job.amp, device):
        loss = CRITERION(job.run(x), y)
    if job.scaler is not None:
        job.scaler.scale(loss).backward()
        job.scaler.step(job.opt)
        job.scaler.update()
    else:
        loss.backward()
        job.opt.step()
    job.opt.zero_grad(set_to_none=True)
