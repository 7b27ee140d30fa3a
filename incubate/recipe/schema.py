"""The recipe's schema: typed dataclasses whose field types say what each key allows (checked by
incubate/recipe/typed.py); YAML files and `--set key=value` overrides only set values."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

import yaml

from ..errors import UserError
from .checks import validate
from . import registries
from ..store.safe_read import kind, parse_yaml, read_yaml
from ..stage_registry import launched, names
from .typed import REGISTRIES, Choices, Items, Overrides, Plain, Range, Sections, Text, build

STAGES = names(trains=True)         # the recipe's sections of a stage's own train values (fields of Recipe)
LAUNCH_STAGES = launched()          # keys of launch.stages: the subcommands a launcher starts

Amp = Literal["none", "bf16", "fp16"]
AtLeast0 = Annotated[int, Range(ge=0)]
AtLeast1 = Annotated[int, Range(ge=1)]
Fraction = Annotated[float, Range(gt=0, le=1)]
NonNegative = Annotated[float, Range(ge=0)]
Blocks = Annotated[list, Items(AtLeast1, min_len=1)]      # blocks a module, one count a module
Name = Annotated[str, Text()]
Seed = Annotated[int, Range(ge=0, lt=2 ** 32, note="a 32-bit seed, as numpy takes")]
Optimizer = Annotated[str, Choices(registries.is_optimizer, registries.optimizers, "timm's optimizers")]
Scheduler = Annotated[str, Choices(registries.is_scheduler, registries.schedulers, "timm's schedulers")]


@dataclass
class ModelCfg:
    family: Name = "vit"                     # adapter in incubate/families
    name: Name = "vit_tiny_patch16_224"      # timm model name
    kwargs: Annotated[dict, Plain()] = field(default_factory=dict)   # timm overrides: img_size, patch_size, depth, ...
    division: Blocks = field(default_factory=lambda: [3, 3, 3, 3])   # target blocks a module
    meta_division: Optional[Blocks] = None   # meta blocks a module; default one each


@dataclass
class AugmentCfg:
    shift: AtLeast0 = 0             # random translation in pixels (in-memory data, batched)
    hflip: bool = False
    auto_augment: Optional[Name] = None   # timm string, e.g. rand-m9-mstd0.5-inc1 (per-image path)
    re_prob: Annotated[float, Range(ge=0, le=1)] = 0.0    # random erasing probability (per-image path)
    # RandomResizedCrop's area range (images): two fractions, the smaller first
    crop_scale: Annotated[list, Items(Fraction, length=2, ordered=True)] = field(default_factory=lambda: [0.08, 1.0])
    # timm's ColorJitter strength; unset = timm's choice (0.4, none beside auto_augment, as in DeiT); 0 = off
    color_jitter: Optional[Annotated[float, Range(ge=0, note="0 = off")]] = None
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"   # resize filter, train and eval
    re_mode: Literal["pixel", "rand", "const"] = "pixel"   # random erasing fill (pixel: per-pixel noise, DeiT)
    re_count: AtLeast1 = 1          # random erasing: at most this many boxes an image
    # eval: resize to img_size / crop_pct, center-crop; unset = 1.0 up to 64 px, else 0.875
    crop_pct: Optional[Fraction] = None


@dataclass
class DataCfg:
    shorthand: ClassVar[str] = "source"     # `data: digits` is `data: {source: digits}`
    source: Name = "digits"          # digits | idx:PATH | imagefolder:PATH | cifar10:PATH | cifar100:PATH | text:PATH
                                    # | jsonl:PATH | parquet:PATH | hf_disk:PATH (text in records, read with datasets)
    img_size: AtLeast1 = 32
    context: AtLeast1 = 256         # text: tokens a window (the model's context)
    # text: byte (vocabulary 256, nothing to train) | bpe (byte-level BPE trained on the training split,
    # saved once as RUN/tokenizer.json)
    tokenizer: Literal["byte", "bpe"] = "byte"
    # text, tokenizer bpe: tokens in the vocabulary (the 256 bytes and the merges)
    vocab_size: Annotated[int, Range(ge=1, le=2 ** 32, note="token ids are at most 32-bit")] = 1024
    # text: share of the bytes held out (whole files of a folder, else a tail)
    val_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.1
    train_fraction: Fraction = 1.0  # class-balanced subset of the training split
    subset_seed: Seed = 0
    num_workers: AtLeast0 = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    eval_batch_size: AtLeast1 = 256
    on_bad_image: Literal["stop", "skip"] = "stop"   # an unreadable image file: stop (name it) | skip (count it)
    # Repeated augmentation (DeiT's RASampler): each training image in this many augmented copies an
    # epoch, on different ranks; the epoch keeps the dataset's length. 1 = off.
    repeated_aug: Annotated[int, Range(ge=1, note="1 = off, 3 = DeiT")] = 1
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    # text: train.eval_every evaluates this many held-out tokens (whole windows spread evenly over
    # the split, the same for every stage); 0 = all of it
    eval_tokens: Annotated[int, Range(ge=0, note="0: the whole held-out split")] = 0
    # text: folder of the token cache (default RUN/token_cache); a shared one tokenizes a corpus once
    cache_dir: Optional[Name] = None
    text_column: str = "text"       # jsonl:, parquet:, hf_disk: sources: the column of strings that holds the text


SavedEvery = Annotated[int, Range(ge=0, note="0: save only at the end of each epoch")]
SavedMinutes = Annotated[float, Range(ge=0, note="0: save only at the end of each epoch")]


@dataclass
class TrainCfg:
    epochs: AtLeast0 = 10
    batch_size: AtLeast1 = 64       # per process, per micro-step
    accum_steps: AtLeast1 = 1
    lr: Annotated[float, Range(gt=0)] = 5e-4   # for an effective batch of lr_base_batch; scaled linearly
    lr_base_batch: AtLeast1 = 512
    min_lr: NonNegative = 1e-6
    warmup_epochs: AtLeast0 = 0
    warmup_lr: NonNegative = 1e-6
    weight_decay: NonNegative = 0.05
    opt: Optimizer = "adamw"        # any timm optimizer name (timm.optim.list_optimizers())
    sched: Scheduler = "cosine"     # any timm scheduler name that create_scheduler_v2 makes
    # sched multistep: epochs at which the lr is divided by 10, in increasing order
    decay_milestones: Optional[Annotated[list, Items(AtLeast1, min_len=1, ordered=True)]] = None
    clip_grad: Optional[Annotated[float, Range(gt=0)]] = None
    label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.1
    mixup: NonNegative = 0.0        # alpha of mixup's Beta distribution; 0 = off
    cutmix: NonNegative = 0.0       # alpha of cutmix's Beta distribution; 0 = off
    drop_path: Annotated[float, Range(ge=0, lt=1)] = 0.0
    amp: Amp = "none"
    fused: bool = False             # fused AdamW (CUDA and CPU)
    compile: bool = False           # torch.compile the whole network (trained and frozen parts)
    grad_checkpointing: bool = False   # recompute block activations in backward (memory for time)
    # ddp: every process holds the whole trained part; fsdp: FSDP2 shards it (and its gradients and
    # optimizer state) block by block over the processes, for models whose state outgrows one device
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # Incubate stage only. true: meta modules after the target compute no weight gradients (ours);
    # false: the official code's semantics (they accumulate .grad nobody reads), for ablations.
    frozen_suffix_grads: bool = True
    max_nonfinite_skips: AtLeast0 = 0   # steps with a NaN/inf loss to skip (no update) before stopping
    tensorboard: bool = True        # event files in RUN/tensorboard/<stage> (rank 0)
    # Inside an epoch, also save the whole training state every N optimizer updates and/or M
    # minutes (rank 0's clock); every epoch's end is saved either way.
    checkpoint_every: SavedEvery = 0
    checkpoint_minutes: SavedMinutes = 0.0
    # Incubate stage only: how a target module starts. random (the paper) | meta: a copy of its meta
    # module (extra blocks the identity) | stack: every block a copy of its meta module's block.
    module_init: Literal["random", "meta", "stack"] = "random"
    # Incubate stage only. false: each module job its own data order and augmentation draws (ours);
    # true: every module job the same ones (the official code, whose jobs share one seed).
    shared_data_order: bool = False
    # text: the budget in training tokens instead of epochs (0 = epochs); the last epoch stops part-way
    tokens: AtLeast0 = 0
    warmup_tokens: AtLeast0 = 0     # with a token budget: the lr warm-up, in tokens
    eval_every: AtLeast0 = 0        # evaluate on data.eval_tokens every N optimizer updates (0 = at epoch ends)


@dataclass
class StageShape:
    """Where one stage's jobs run (`launch.stages.<stage>`); 0 takes the launch-wide default."""
    nodes: AtLeast1 = 1             # > 1: one job over several nodes (--launcher slurm only)
    devices_per_node: AtLeast0 = 0  # GPUs (CPU: processes) a node, one process each; 0 = launch.devices_per_job
    cpus_per_task: AtLeast0 = 0     # CPU threads a process; 0 = launch.cpus_per_job
    time_min: AtLeast0 = 0          # SLURM time limit of the job in minutes; 0 = launch.slurm's timeout_min


@dataclass
class LaunchCfg:
    """How `incubate run --launcher local|ray|slurm` places each job (a stage or one module)."""
    devices_per_job: AtLeast0 = 0   # GPUs (CPU: processes) a job; 0 = split the visible GPUs; > 1 runs torchrun
    cpus_per_job: AtLeast0 = 0      # CPU threads a job; 0 = split the machine's cores between running jobs
    retries: AtLeast0 = 0           # extra tries of a failed job (each resumes from its checkpoint)
    # submitit parameters, e.g. {slurm_partition: gpu, timeout_min: 4320}
    slurm: Annotated[dict, Plain()] = field(default_factory=dict)
    # Per-stage shapes, e.g. {meta: {nodes: 4, devices_per_node: 8}}; a stage left out gets one node
    # with devices_per_job devices.
    stages: Annotated[dict, Sections(StageShape, LAUNCH_STAGES)] = field(default_factory=dict)

    def shape(self, stage: str) -> StageShape:
        """The stage's shape with the launch-wide defaults filled in (`stage` as the CLI names it)."""
        s = self.stages.get(stage, StageShape())
        return StageShape(s.nodes, s.devices_per_node or self.devices_per_job, s.cpus_per_task or self.cpus_per_job,
                          s.time_min)


StageOverrides = Annotated[dict, Overrides(TrainCfg)]     # a stage's own values of train keys


@dataclass
class Recipe:
    name: Name = "recipe"
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    launch: LaunchCfg = field(default_factory=LaunchCfg)
    meta: StageOverrides = field(default_factory=dict)
    incubate: StageOverrides = field(default_factory=dict)
    finetune: StageOverrides = field(default_factory=dict)
    e2e: StageOverrides = field(default_factory=dict)
    grow: StageOverrides = field(default_factory=dict)    # G_stack growth: the target from the meta model's layers, then E2E

    def stage(self, name: str) -> TrainCfg:
        """The training settings of one stage: `train` with the stage's overrides applied (a stage's
        own budget, epochs or tokens, replaces the shared one)."""
        own = copy.deepcopy(getattr(self, name))
        if "epochs" in own and "tokens" not in own:
            own["tokens"] = 0
        return dataclasses.replace(copy.deepcopy(self.train), **own)

    @property
    def meta_division(self) -> list:
        return list(self.model.meta_division or [1] * len(self.model.division))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _one_budget(raw: dict) -> None:
    """A section sets its budget in epochs or in tokens, never both."""
    for section in ("train",) + STAGES:
        keys = raw.get(section) if isinstance(raw.get(section), dict) else {}
        if "epochs" in keys and keys.get("tokens"):
            raise UserError(f"{section} sets both epochs ({keys['epochs']}) and tokens ({keys['tokens']}): a "
                            f"stage's budget is one of the two; remove one (a stage's own budget, e.g. "
                            f"--set meta.tokens=N, replaces the one under train)")


def _budget_replaced(raw: dict, overrides: list) -> dict:
    """The file's budget of a section that --set gives the other kind of budget is dropped:
    --set meta.tokens=N replaces the recipe's meta.epochs (and the other way round)."""
    raw = copy.deepcopy(raw)
    for keys, _ in overrides:
        if len(keys) == 2 and keys[1] in ("epochs", "tokens") and isinstance(raw.get(keys[0]), dict):
            raw[keys[0]].pop("tokens" if keys[1] == "epochs" else "epochs", None)
    return raw


def parse_set(items: list[str]) -> list[tuple[list[str], Any]]:
    """Parse `key.sub=value` strings; values are YAML (numbers, booleans, lists, null)."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip().split("."), value))
    return out


def apply_overrides(raw: dict, overrides: list[tuple[list[str], Any]]) -> dict:
    raw = copy.deepcopy(raw)
    for keys, value in overrides:
        node = raw
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if isinstance(nxt, str) and k == "data":
                nxt = {DataCfg.shorthand: nxt}
            if nxt is None:
                nxt = {}
            if not isinstance(nxt, dict):
                raise UserError(f"--set {'.'.join(keys)}: '{'.'.join(keys[:i + 1])}' is not a section")
            node[k] = nxt
            node = nxt
        node[keys[-1]] = value
    return raw


RECIPE_FIX = "pass --recipe with a YAML file (see recipes/)"


def read_recipe_file(path: str | Path, fix: str = RECIPE_FIX) -> dict:
    """The mapping of keys in a recipe file, read within safe_read's limits; an empty file is refused
    (it would train every default, which nobody means)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe file {p} does not exist; {fix}")
    raw = read_yaml(p, "recipe file", fix)
    if raw is None:
        raise UserError(f"recipe file {p} is empty (no keys); {fix}, e.g. one of recipes/")
    if not isinstance(raw, dict):
        raise UserError(f"recipe file {p} must hold a mapping of keys, got {kind(raw)}; {fix}")
    return raw


def load_recipe(path: str | Path | None, sets: list[str] | None = None, family_checks: bool = True) -> Recipe:
    """The recipe at `path` with `sets` applied, every key checked; family_checks=False leaves out the
    checks that import the family's adapter or timm's registries (for reading a run directory's
    recipe, checked when written)."""
    raw = read_recipe_file(path) if path is not None else {}
    overrides = parse_set(sets or [])
    _one_budget(raw)
    _one_budget(apply_overrides({}, overrides))
    raw = apply_overrides(_budget_replaced(raw, overrides), overrides)
    token = REGISTRIES.set(family_checks)
    try:
        recipe = build(Recipe, raw)
    finally:
        REGISTRIES.reset(token)
    validate(recipe, STAGES, family_checks)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    raw = recipe.to_dict()
    if raw["train"]["tokens"]:      # the budget is in tokens: the default epochs would read as a second budget
        del raw["train"]["epochs"]
    return yaml.safe_dump(raw, sort_keys=False)
