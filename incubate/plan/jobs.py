"""The networks `incubate plan` traces, one a stage or module job, as the stages build them (the
target, the meta model, hybrid i with the target pruned to module i), and their traces turned into
the plan's figures (incubate/plan/estimate.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..data.spec import ImageSpec, TextSpec
from ..errors import UserError
from ..families import get_family
from ..tasks import modality_of
from ..families.base import weight_shapes
from ..stage_registry import E2E, FINETUNE, GROW, INCUBATE, META
from .memory import FSDP_REFERENCES, SCALE_DEPTHS, StepShape, Trace, rescale, scaled_trace, trace_step

WORLDS = (1, 2, 4, 8, 16, 32, 64)       # devices at which FSDP's peak is given
CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "idx": 10}     # sources whose classes are known


@dataclass
class Job:
    """One stage or module job's figures (bytes, FLOPs, hours)."""
    name: str
    stage: str
    params: int
    trained: int
    frozen: int
    unit: str                       # token | sample
    flops_per_unit: float
    budget_units: int | None        # tokens or samples of the stage's budget; None: unknown
    state: dict                     # model state unsharded: params, grads, optimizer (bytes)
    ddp: dict                       # devices -> peak bytes a device
    fsdp: dict
    scaled: bool
    run: dict = field(default_factory=dict)     # how it runs at --device-memory: mode, devices, hours

    @property
    def flops(self) -> float | None:
        return None if self.budget_units is None else self.flops_per_unit * self.budget_units




@dataclass
class Setting:
    """What the plan knows of a recipe without reading its data."""
    recipe: object
    family: object
    spec: ImageSpec | TextSpec      # what the stages would read of the data (incubate/data/spec.py)
    samples: int | None     # training samples an epoch (text: windows of the context's tokens)
    notes: list = field(default_factory=list)

    @property
    def text(self) -> bool:
        return self.spec.modality == "text"

    @property
    def per_sample(self) -> int:
        """Tokens a sample for text (a window), 1 for an image: the unit a budget counts."""
        return self.spec.context if self.text else 1

    @classmethod
    def of(cls, recipe, classes: int | None, train_samples: int | None) -> "Setting":
        family = get_family(recipe.model.family)
        d, kind = recipe.data, recipe.data.source.partition(":")[0]
        if modality_of(recipe.model.family) == "text":
            vocab = 256 if d.tokenizer == "byte" else d.vocab_size
            notes = [f"vocabulary {vocab} (data.tokenizer: {d.tokenizer}), context {d.context}"]
            return cls(recipe, family, TextSpec(d.context, vocab, d.tokenizer), train_samples, notes)
        classes = classes or CLASSES.get(kind)
        if classes is None:
            raise UserError(f"incubate plan does not read data.source '{d.source}' to count its classes; pass "
                            f"--classes N (e.g. --classes 1000 for ImageNet-1K)")
        samples = None if train_samples is None else int(train_samples * d.train_fraction)
        notes = [f"{classes} classes, {d.img_size}px images"]
        spec = ImageSpec.unnamed(1 if kind in ("digits", "idx") else 3, d.img_size, classes)
        return cls(recipe, family, spec, samples, notes)

    def kwargs(self, division: list, meta: bool = False) -> dict:
        return self.family.model_kwargs(self.recipe.model, self.spec, division, meta=meta)

    def build(self, division: list, meta: bool = False, drop_path: float = 0.0):
        return self.family.build(self.recipe.model.name, self.kwargs(division, meta), drop_path=drop_path)


def _data(s: Setting, batch: int):
    import torch
    d = s.spec
    if s.text:
        return lambda: (lambda x: (x, x))(torch.randint(0, d.vocab_size, (batch, d.context)))
    return lambda: (torch.randn(batch, d.channels, d.size, d.size), torch.randint(0, d.classes, (batch,)))


def _loss(s: Setting, cfg):
    """The training loss (images: cross-entropy on hard labels; mixup's soft targets differ by one
    batch x classes tensor)."""
    if s.text:
        from ..tasks.causal_lm import _NextTokenLoss
        return _NextTokenLoss(cfg.label_smoothing)
    from torch import nn
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def _uniform(s: Setting) -> bool:
    """Whether the family's blocks are one stack of equal shapes (depth can be scaled exactly)."""
    import torch
    with torch.device("meta"):
        blocks = s.family.block_modules(s.build(s.recipe.meta_division, meta=True))
    return len({weight_shapes(b) for b in blocks}) == 1


def _maker(s: Setting, stage: str, index: int, drop_path: float, uniform: bool):
    """make(depth) -> (net, trained, model): depth the blocks of the scaled part (None: the recipe's)."""
    from ..modular import Hybrid
    division, meta_div = list(s.recipe.model.division), s.recipe.meta_division
    if stage == META:
        def make(depth):
            model = s.build(meta_div, meta=True, drop_path=drop_path)
            return model, model, model
        return make, None
    if stage == INCUBATE:
        def make(depth):
            div = division if depth is None else [depth if j == index else 1 for j in range(len(division))]
            target = s.family.keep_only(s.build(div, drop_path=drop_path), div, index)
            net = Hybrid(s.family, s.build(meta_div, meta=True), meta_div, target, div, index)
            return net, net.runner, target
        return make, (division[index] if uniform else None)

    def make(depth):
        model = s.build(division if depth is None else [depth], drop_path=drop_path)
        return model, model, model
    return make, (sum(division) if uniform else None)


def _shape(cfg) -> StepShape:
    return StepShape(cfg.batch_size, cfg.accum_steps, cfg.amp, cfg.opt, cfg.fused, cfg.weight_decay,
                     cfg.grad_checkpointing, cfg.label_smoothing)


def _traces(s: Setting, stage: str, index: int, uniform: bool) -> tuple[Trace, dict, bool]:
    """The DDP trace and the FSDP traces at the reference world sizes of one job."""
    cfg = s.recipe.stage(stage)
    make, depth = _maker(s, stage, index, cfg.drop_path, uniform)
    data, loss, shape = _data(s, cfg.batch_size), _loss(s, cfg), _shape(cfg)
    ddp, scaled = scaled_trace(lambda d: trace_step(lambda: make(d), data, loss, shape, s.family), depth)
    fsdp = {w: scaled_trace(lambda d: trace_step(lambda: make(d), data, loss, shape, s.family, w), depth)[0]
            for w in FSDP_REFERENCES}
    return ddp, fsdp, scaled


def _budget_units(s: Setting, stage: str) -> int | None:
    cfg = s.recipe.stage(stage)
    if s.text and cfg.tokens:
        return cfg.tokens
    if s.samples is None:
        return None
    return cfg.epochs * s.samples * s.per_sample


def _job(s: Setting, name: str, stage: str, traced) -> Job:
    ddp, fsdp, scaled = traced
    cfg = s.recipe.stage(stage)
    per_step = cfg.batch_size * s.per_sample
    ddp_peak = {w: ddp.peak + (ddp.grad_bytes if w > 1 else 0) for w in WORLDS}     # DDP's buckets: a grads' copy
    fsdp_peak = {w: max(rescale(t, ref, w).peak for ref, t in fsdp.items()) for w in WORLDS}
    return Job(name, stage, ddp.params, ddp.trained, ddp.params - ddp.trained, "token" if s.text else "sample",
               ddp.flops / per_step, _budget_units(s, stage),
               {"params": ddp.param_bytes, "grads": ddp.grad_bytes, "optimizer": ddp.opt_bytes},
               ddp_peak, fsdp_peak, scaled)


def _traced(s: Setting, name: str, stage: str, index: int, uniform: bool):
    """_traces, a step that cannot be traced refused in one line (UserError passes as it is)."""
    try:
        return _traces(s, stage, index, uniform)
    except (RuntimeError, TypeError, ValueError, AssertionError, NotImplementedError) as e:
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(f"incubate plan cannot trace a training step of {name} for recipe {s.recipe.name}: "
                        f"{type(e).__name__}: {why}; check the recipe's model and train sections "
                        f"(--debug shows where)") from e


def trace_jobs(s: Setting) -> list[Job]:
    """Every stage and module job of the recipe, traced (jobs of equal networks and settings once)."""
    uniform = _uniform(s)
    k = len(s.recipe.model.division)
    specs = [(META, META, 0)] + [(f"hybrid {i}", INCUBATE, i) for i in range(k)] + \
        [(FINETUNE, FINETUNE, 0), (E2E, E2E, 0)]
    if hasattr(s.family, "grow_from_meta"):
        specs.append((GROW, GROW, 0))
    cache, jobs = {}, []
    for name, stage, index in specs:
        cfg = s.recipe.stage(stage)
        network = stage if stage in (META, INCUBATE) else "target"
        key = (network, index, _shape(cfg), cfg.drop_path)
        if key not in cache:
            cache[key] = _traced(s, name, stage, index, uniform)
        jobs.append(_job(s, name, stage, cache[key]))
    if uniform and any(j.scaled for j in jobs):
        a, b = SCALE_DEPTHS
        s.notes.append(f"networks deeper than {b} blocks traced at {a} and {b} equal blocks and scaled exactly")
    return jobs
