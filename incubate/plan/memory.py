"""Peak memory and FLOPs of one training step, nothing allocated: the network is built and stepped
under FakeTensorMode (tensors with shapes and no storage) while torch's MemTracker (DDP: the plain
step; the all-reduce buckets are added by count) or FSDPMemTracker (FSDP2 on a fake process group,
`torch.testing._internal.distributed.fake_pg.FakeStore`, as torchtitan's estimator does) records
every tensor alive at each moment. `incubate plan` (incubate/plan/estimate.py) reads these traces.

The traced step is the steady one: the optimizer state exists before it (set up by one step on zero
gradients), and with train.accum_steps > 1 two micro-steps run, the second with every gradient held.
Under FSDP each of `family.block_modules` of the trained part is one `fully_shard` unit, then the
trained part's root; train.amp bf16 maps to MixedPrecisionPolicy(bf16 parameters, fp32 reduction);
a hybrid's frozen meta model stays whole on every rank (counted as its parameters' bytes).
"""
from __future__ import annotations

import contextlib
import gc
import math
import warnings
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

SCALE_DEPTHS = (1, 2)           # a deep network is traced at these many equal blocks and extrapolated
FSDP_REFERENCES = (8,)          # fake world sizes traced; the others rescale their sharded parts (tests: exact)
SHARDED = ("SHARDED_PARAM", "SHARDED_GRAD", "OPT")


@dataclass(frozen=True)
class StepShape:
    """What of a stage's settings changes a step's memory."""
    batch: int
    accum: int
    amp: str
    opt: str
    fused: bool
    weight_decay: float
    grad_checkpointing: bool
    label_smoothing: float


@dataclass
class Trace:
    """One traced step: the peak (bytes) and its parts by kind, and counts that travel with it."""
    peak: int
    parts: dict = field(default_factory=dict)
    flops: int = 0              # forward and backward of one micro-step (DDP trace only)
    params: int = 0             # parameters of the whole network
    trained: int = 0            # of which trained
    param_bytes: int = 0        # model state, unsharded: parameters, gradients, optimizer state
    grad_bytes: int = 0
    opt_bytes: int = 0
    sharded: dict = field(default_factory=dict)     # FSDP: [(dim0, bytes of the rest)] of sharded tensors
    frozen_bytes: int = 0

    def extrapolate(self, other: "Trace", steps: float) -> "Trace":
        """The trace `steps` times (other - self) beyond `other`: exact for a stack of equal blocks
        (every count and byte grows by the same amount a block)."""
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "parts":
                out[f.name] = {k: _lin(a.get(k, 0), b.get(k, 0), steps) for k in set(a) | set(b)}
            elif f.name == "sharded":
                out[f.name] = b
            else:
                out[f.name] = _lin(a, b, steps)
        return Trace(**out)


def _lin(a: int, b: int, steps: float) -> int:
    return int(round(b + (b - a) * steps))


def scaled_trace(trace_at, depth: int) -> tuple[Trace, bool]:
    """trace_at(d) traced at the network's depth when it is at most SCALE_DEPTHS[1]; else at both of
    SCALE_DEPTHS equal blocks and extrapolated to `depth` (True: scaled). Tracing time grows faster
    than the depth (MemTracker visits every module at every op)."""
    small, big = SCALE_DEPTHS
    if depth is None or depth <= big:
        return trace_at(depth), False
    a, b = trace_at(small), trace_at(big)
    return a.extrapolate(b, (depth - big) / (big - small)), True


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _init_optimizer_state(trained: nn.Module, optimizer) -> None:
    """The state a steady step starts with (AdamW's moments exist from the first step on)."""
    params = [p for p in trained.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _flop_counter():
    """FlopCounterMode that also prices the CPU's fused attention kernel, as the math backend counts it."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
    aten = torch.ops.aten

    def forward(q, k, v, *args, out_shape=None, **kwargs):      # FlopCounterMode hands shapes
        return sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        # less the recomputed q @ k.T, which the math backend (the stages' count) does not redo
        return sdpa_backward_flop_count(grad_out, q, k, v) - 2 * q[0] * q[1] * q[2] * q[3] * k[2]
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})


def _micro_steps(net, loss_fn, x, y, shape: StepShape) -> None:
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16 if shape.amp == "bf16" else torch.float16) \
        if shape.amp != "none" else contextlib.nullcontext()
    for _ in range(min(shape.accum, 2)):
        with amp:
            loss = loss_fn(net(x), y)
        (loss / shape.accum).backward()


def _make_optimizer(trained: nn.Module, shape: StepShape):
    from timm.optim import create_optimizer_v2
    kwargs = {"fused": True} if shape.fused else {}
    return create_optimizer_v2(trained, opt=shape.opt, lr=1e-3, weight_decay=shape.weight_decay, **kwargs)


def _mesh_and_policy(world: int, amp: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    mesh = init_device_mesh("cpu", (world,))     # outside fake mode: the mesh reads real rank lists
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if amp == "bf16" \
        else MixedPrecisionPolicy()
    return mesh, policy


def trace_step(make, data, loss_fn, shape: StepShape, family=None, world: int = 0) -> Trace:
    """One steady training step of `make()` -> (net, trained, model) on `data()` -> (x, y), traced
    under FakeTensorMode. world 0: a plain (DDP) step, with its FLOPs; world >= 1: FSDP2 over `world`
    ranks of a fake process group (`model`'s blocks, then `trained`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with contextlib.ExitStack() as stack:
        # ModTracker warns of its module hierarchy when one module object runs twice (the rotary embedding)
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="The module hierarchy tracking")
        mesh_policy = None
        if world:
            stack.enter_context(fake_process_group(world))
            mesh_policy = _mesh_and_policy(world, shape.amp)
        with torch.device("meta"):      # built without values (timm's init reads some), then made fake
            net, trained, model = make()
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))     # the meta-device parameters
        net.to_empty(device="cpu")
        if shape.grad_checkpointing:
            from ..train.step import enable_grad_checkpointing
            enable_grad_checkpointing(net, trained, family)
        trace = _counts(net, trained)
        if world:
            trace.sharded = _fully_shard(family, trained, model, *mesh_policy)
        optimizer = _make_optimizer(trained, shape)
        _init_optimizer_state(trained, optimizer)
        if not world:       # the unsharded optimizer state (a sharded trace's is in its parts)
            trace.opt_bytes = sum(_bytes(v) for s in optimizer.state.values() for v in s.values()
                                  if torch.is_tensor(v))
        x, y = data()
        tracker, counter = _tracker(net, trained, optimizer, (x, y), world)
        with _no_cycle_collection(), tracker, counter:
            _micro_steps(net, loss_fn, x, y, shape)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
    trace.parts = {_kind(k): v for k, v in snap.items() if k != "Total" and v}
    trace.peak = snap["Total"]
    if world:       # FSDPMemTracker does not see the frozen meta model: it lives outside the FSDP units
        trace.parts["FROZEN_PARAM"] = trace.frozen_bytes
        trace.peak += trace.frozen_bytes
    else:
        trace.flops = int(counter.get_total_flops()) // min(shape.accum, 2)
    return trace


@contextlib.contextmanager
def _no_cycle_collection():
    """Tensors that only Python's cycle collector frees (recomputed layers leave some) count as alive
    to the step's end, so the planned peak is an upper bound that does not depend on when it runs."""
    gc.collect()
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _counts(net: nn.Module, trained: nn.Module) -> Trace:
    """Parameters and the unsharded model state's bytes (parameters, gradients) of a network."""
    mine = [p for p in trained.parameters() if p.requires_grad]
    return Trace(0, params=sum(p.numel() for p in net.parameters()), trained=sum(p.numel() for p in mine),
                 param_bytes=sum(_bytes(p) for p in net.parameters()), grad_bytes=sum(_bytes(p) for p in mine),
                 frozen_bytes=sum(_bytes(p) for p in net.parameters() if not p.requires_grad))


def _tracker(net, trained, optimizer, inputs, world: int):
    """MemTracker for a plain step (and a FLOP counter); FSDPMemTracker for a sharded one."""
    if world:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        tracker = FSDPMemTracker(trained, optimizer)
        tracker.track_inputs(inputs)
        return tracker, contextlib.nullcontext()
    tracker = _frozen_aware_tracker()
    tracker.track_external(net, optimizer, *inputs)
    return tracker, _flop_counter()


class _NoHook:
    def remove(self) -> None:
        pass


def _frozen_aware_tracker():
    """torch's MemTracker, which hooks the gradient of every parameter a module runs with: a frozen one
    (a hybrid's meta model) refuses hooks and has no gradient, so it is marked as hooked already."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
            for p in module.parameters():
                if not p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)
    return Tracker()


def _kind(key) -> str:
    return getattr(key, "name", str(key))       # the trackers' reference kinds: PARAM, ACT, SHARDED_PARAM, ...


def _fully_shard(family, trained: nn.Module, model: nn.Module, mesh, policy) -> list:
    """One fully_shard unit a block with parameters, then the trained part's root; returns
    [(dim 0, bytes of the other dims)] of every sharded tensor, for rescaling to other world sizes."""
    from torch.distributed.fsdp import fully_shard
    shapes = [(p.shape[0] if p.dim() else 1, _bytes(p) // max(p.shape[0] if p.dim() else 1, 1))
              for p in trained.parameters() if p.requires_grad]
    for block in family.block_modules(model):
        if any(True for _ in block.parameters()):
            fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(trained, mesh=mesh, mp_policy=policy)
    return shapes


def shard_bytes(shapes: list, world: int) -> int:
    """Bytes of one rank's shards at `world` ranks: FSDP2 cuts dim 0 into ceil(dim0 / world) rows
    (the first ranks hold full chunks: the largest rank is counted)."""
    return sum(math.ceil(d0 / world) * rest for d0, rest in shapes)


def rescale(trace: Trace, reference: int, world: int) -> Trace:
    """An FSDP trace at `reference` ranks moved to `world` ranks: the sharded parameters, gradients and
    optimizer state at the peak scale with the shard size; gathered blocks, activations and
    temporaries do not depend on the world size."""
    ratio = shard_bytes(trace.sharded, world) / max(shard_bytes(trace.sharded, reference), 1)
    parts = dict(trace.parts)
    for k in SHARDED:
        if k in parts:
            parts[k] = int(round(parts[k] * ratio))
    return replace(trace, parts=parts, peak=trace.peak + sum(parts.get(k, 0) - trace.parts.get(k, 0) for k in SHARDED))


@contextlib.contextmanager
def fake_process_group(world: int):
    """A fake process group of `world` ranks (this process rank 0): collectives return at once."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        from ..errors import UserError
        raise UserError("incubate plan traces on a fake process group of its own; run it outside torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
