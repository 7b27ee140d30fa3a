"""Typed recipe: dataclasses only. YAML files and `--set key=value` overrides only set values.

A recipe has shared training settings (`train`) and, per stage (`meta`, `incubate`, `finetune`,
`e2e`), a mapping of overrides of those settings. Unknown keys and values of the wrong type are
errors naming the key and the valid choices.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError

STAGES = ("meta", "incubate", "finetune", "e2e", "grow")


@dataclass
class ModelCfg:
    family: str = "vit"                      # adapter in incubate/families
    name: str = "vit_tiny_patch16_224"       # timm model name
    kwargs: dict = field(default_factory=dict)   # timm overrides: img_size, patch_size, depth, ...
    division: list = field(default_factory=lambda: [3, 3, 3, 3])   # target blocks a module
    meta_division: Optional[list] = None     # meta blocks a module; default one each


@dataclass
class AugmentCfg:
    shift: int = 0                  # random translation in pixels (in-memory data, batched)
    hflip: bool = False
    auto_augment: Optional[str] = None   # timm string, e.g. rand-m9-mstd0.5-inc1 (per-image path)
    re_prob: float = 0.0            # random erasing probability (per-image path)
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])   # RandomResizedCrop (images)
    # The per-image path's other timm transforms. Defaults are what it always did, so no recipe
    # changes meaning. color_jitter: brightness/contrast/saturation strength of timm's ColorJitter;
    # unset = timm's choice (0.4, or none when auto_augment is set: RandAugment does colour itself,
    # as in DeiT); 0 = off; a value > 0 with auto_augment is refused (timm would ignore it).
    color_jitter: Optional[float] = None
    interpolation: str = "bicubic"  # resize filter, train crop and eval resize: bicubic | bilinear | nearest
    re_mode: str = "pixel"          # random erasing fill: pixel (per-pixel noise, DeiT) | rand | const
    re_count: int = 1               # random erasing: at most this many boxes an image
    crop_pct: Optional[float] = None   # eval: resize to img_size / crop_pct, center-crop; unset = 1.0 up to 64 px, else 0.875


@dataclass
class DataCfg:
    source: str = "digits"          # digits | idx:PATH | imagefolder:PATH | cifar10:PATH | cifar100:PATH | text:PATH
                                    # | jsonl:PATH | parquet:PATH | hf_disk:PATH (text in records, read with datasets)
    img_size: int = 32
    context: int = 256              # text: tokens a window (the model's context)
    tokenizer: str = "byte"         # text: byte (vocabulary 256, nothing to train) | bpe (byte-level BPE trained on
                                    # the training split, saved once as RUN/tokenizer.json)
    vocab_size: int = 1024          # text, tokenizer bpe: tokens in the vocabulary (the 256 bytes and the merges)
    val_fraction: float = 0.1       # text: share of the bytes held out (whole files of a folder, else a tail)
    train_fraction: float = 1.0     # class-balanced subset of the training split
    subset_seed: int = 0
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    eval_batch_size: int = 256
    on_bad_image: str = "stop"      # an unreadable image file: stop (name it) | skip (count and report)
    # Repeated augmentation (DeiT's RASampler, the paper's ImageNet recipe): each training image in
    # this many augmented copies an epoch, the copies on different ranks; the epoch keeps the
    # dataset's length (so it sees about 1/repeated_aug of the images). 1 = off.
    repeated_aug: int = 1
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    eval_tokens: int = 0            # text: train.eval_every evaluates this many held-out tokens (whole windows
                                    # spread evenly over the split, the same for every stage); 0 = all of it
    cache_dir: Optional[str] = None  # text: folder of the token cache (default RUN/token_cache); a shared one
                                     # tokenizes a corpus once for many runs
    text_column: str = "text"       # jsonl:, parquet:, hf_disk: sources: the column of strings that holds the text


@dataclass
class TrainCfg:
    epochs: int = 10
    batch_size: int = 64            # per process, per micro-step
    accum_steps: int = 1
    lr: float = 5e-4                # for an effective batch of lr_base_batch; scaled linearly
    lr_base_batch: int = 512
    min_lr: float = 1e-6
    warmup_epochs: int = 0
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    opt: str = "adamw"              # any timm optimizer name
    sched: str = "cosine"           # any timm scheduler name
    decay_milestones: Optional[list] = None   # sched multistep: epochs at which the lr is divided by 10
    clip_grad: Optional[float] = None
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    drop_path: float = 0.0
    amp: str = "none"               # none | bf16 | fp16
    fused: bool = False             # fused AdamW (CUDA and CPU)
    compile: bool = False           # torch.compile the whole network (trained and frozen parts)
    grad_checkpointing: bool = False   # recompute block activations in backward (memory for time)
    # Incubate stage only. true: meta modules after the target compute no weight gradients (ours).
    # false: the official code's semantics, kept for ablations: they keep requires_grad, stay out of
    # the optimizer and accumulate .grad that nobody reads. Target gradients are identical either way.
    frozen_suffix_grads: bool = True
    max_nonfinite_skips: int = 0    # steps with a NaN/inf loss to skip (no update) before stopping
    tensorboard: bool = True        # event files in RUN/tensorboard/<stage> (rank 0): per-update loss, lr,
                                    # samples/s, gradient norm, FLOPs so far; per-epoch evaluation
    # Inside an epoch, also save the whole training state (mid-epoch checkpoint) every N optimizer
    # updates and/or when M minutes passed since the last save (rank 0's clock); 0 = off. Every
    # epoch's end is saved either way.
    checkpoint_every: int = 0
    checkpoint_minutes: float = 0.0
    # Incubate stage only: how a target module starts. random (the paper) | meta: as a copy of its
    # meta module (extra blocks start as the identity), so hybrid and assembly start as the meta model
    # | stack: every block a copy of its meta module's block (depthwise stacking).
    module_init: str = "random"
    # Incubate stage only. false: each module job its own data order and augmentation draws (ours);
    # true: every module job the same ones (the official code, whose jobs share one seed).
    shared_data_order: bool = False
    tokens: int = 0                 # text: the budget in training tokens instead of epochs (0 = epochs); the
                                    # last epoch stops part-way, so at most one epoch reads each window once
    warmup_tokens: int = 0          # with a token budget: the lr warm-up, in tokens (warmup_epochs is for epochs)
    eval_every: int = 0             # evaluate on data.eval_tokens every N optimizer updates (0 = at epoch ends)


LAUNCH_STAGES = ("meta", "incubate", "assemble", "finetune", "e2e", "grow")


@dataclass
class StageShape:
    """Where one stage's jobs run (`launch.stages.<stage>`); 0 takes the launch-wide default."""
    nodes: int = 1                  # > 1: one job over several nodes (--launcher slurm only)
    devices_per_node: int = 0       # GPUs (CPU: processes) a node, one process each; 0 = launch.devices_per_job
    cpus_per_task: int = 0          # CPU threads a process; 0 = launch.cpus_per_job
    time_min: int = 0               # SLURM time limit of the job in minutes; 0 = launch.slurm's timeout_min


@dataclass
class LaunchCfg:
    """How `incubate run --launcher local|ray|slurm` places each job (a stage or one module)."""
    devices_per_job: int = 0        # GPUs (CPU: processes) a job; 0 = split the visible GPUs between running jobs; > 1 runs torchrun
    cpus_per_job: int = 0           # CPU threads a job; 0 = split the machine's cores between running jobs
    retries: int = 0                # extra tries of a failed job (each resumes from its checkpoint)
    slurm: dict = field(default_factory=dict)   # submitit parameters, e.g. {slurm_partition: gpu, timeout_min: 4320}
    # Per-stage shapes, e.g. {meta: {nodes: 4, devices_per_node: 8}, incubate: {devices_per_node: 8}};
    # a stage left out gets one node with devices_per_job devices.
    stages: dict = field(default_factory=dict)

    def __post_init__(self):
        shapes = {}
        for name, value in (self.stages or {}).items():
            if name not in LAUNCH_STAGES:
                raise UserError(f"unknown stage 'launch.stages.{name}'; valid stages: {', '.join(LAUNCH_STAGES)}")
            shape = value if isinstance(value, StageShape) else _coerce(value, StageShape, f"launch.stages.{name}")
            for key in ("nodes", "devices_per_node", "cpus_per_task", "time_min"):
                least = 1 if key == "nodes" else 0
                if getattr(shape, key) < least:
                    raise UserError(f"launch.stages.{name}.{key} must be >= {least}, got {getattr(shape, key)}")
            shapes[name] = shape
        self.stages = shapes

    def shape(self, stage: str) -> StageShape:
        """The stage's shape with the launch-wide defaults filled in (`stage` as the CLI names it)."""
        s = self.stages.get(stage, StageShape())
        return StageShape(s.nodes, s.devices_per_node or self.devices_per_job, s.cpus_per_task or self.cpus_per_job,
                          s.time_min)


@dataclass
class Recipe:
    name: str = "recipe"
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    deterministic: bool = False
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    launch: LaunchCfg = field(default_factory=LaunchCfg)
    meta: dict = field(default_factory=dict)       # overrides of train for each stage
    incubate: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)
    e2e: dict = field(default_factory=dict)
    grow: dict = field(default_factory=dict)      # G_stack growth: the target from the meta model's layers, then E2E

    def stage(self, name: str) -> TrainCfg:
        """The training settings of one stage: `train` with the stage's overrides applied (a stage's
        own budget, epochs or tokens, replaces the shared one)."""
        own = getattr(self, name)
        merged = dict(dataclasses.asdict(self.train), **own)
        if "epochs" in own and "tokens" not in own:
            merged["tokens"] = 0
        return _build(TrainCfg, merged, name)

    @property
    def meta_division(self) -> list:
        return list(self.model.meta_division or [1] * len(self.model.division))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, where: str):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and tp is DataCfg and isinstance(value, str):
            value = {"source": value}          # shorthand `data: digits`
        if not isinstance(value, dict):
            raise UserError(f"recipe key '{where}' must be a mapping, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)         # 1e7 (YAML reads it as a string) or 2.0e6: a whole number
        if number is not None and number.is_integer():
            return int(number)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):      # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    raise UserError(f"recipe key '{where}' must be of type {_type_name(tp)}, got {value!r}; "
                    f"fix the recipe or the --set value")


def _number(value) -> float | None:
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


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


def _build(cls, values: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    if cls is Recipe:
        for stage in STAGES:    # stage sections hold overrides of TrainCfg keys
            hints[stage] = dict
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise UserError(f"unknown recipe key '{path}'; valid keys{' under ' + where if where else ''}: "
                            f"{', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    if cls is Recipe:
        train_names = [f.name for f in fields(TrainCfg)]
        for stage in STAGES:
            for key in kwargs.get(stage, {}):
                if key not in train_names:
                    raise UserError(f"unknown recipe key '{stage}.{key}'; valid keys under {stage}: "
                                    f"{', '.join(train_names)}")
    obj = cls(**kwargs)
    if cls is Recipe:
        for stage in STAGES:
            obj.stage(stage)     # type-check the overrides now, not when the stage starts
    return obj


def parse_set(items: list[str]) -> list[tuple[list[str], Any]]:
    """Parse `key.sub=value` strings; values are YAML (numbers, booleans, lists, null)."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
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
                nxt = {"source": nxt}
            if nxt is None:
                nxt = {}
            if not isinstance(nxt, dict):
                raise UserError(f"--set {'.'.join(keys)}: '{'.'.join(keys[:i + 1])}' is not a section")
            node[k] = nxt
            node = nxt
        node[keys[-1]] = value
    return raw


def load_recipe(path: str | Path | None, sets: list[str] | None = None) -> Recipe:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"recipe file {p} does not exist; pass --recipe with a YAML file "
                            f"(see recipes/)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"recipe file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UserError(f"recipe file {p} must hold a mapping of keys, got {type(raw).__name__}")
    overrides = parse_set(sets or [])
    _one_budget(raw)
    _one_budget(apply_overrides({}, overrides))
    raw = apply_overrides(_budget_replaced(raw, overrides), overrides)
    recipe = _build(Recipe, raw)
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    m = recipe.model
    for name, div in (("model.division", m.division), ("model.meta_division", recipe.meta_division)):
        if not div or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in div):
            raise UserError(f"{name} must be a list of positive block counts, got {div}")
    if len(recipe.meta_division) != len(m.division):
        raise UserError(f"model.meta_division has {len(recipe.meta_division)} modules but "
                        f"model.division has {len(m.division)}; give both the same K")
    from .families import get_family      # here, not at the top: the adapters import timm
    family = get_family(m.family)
    family.validate(m)
    if recipe.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device must be auto, cpu or cuda, got {recipe.device!r}")
    for stage in STAGES:
        cfg = recipe.stage(stage)
        if cfg.grad_checkpointing and getattr(family, "no_grad_checkpointing", None):
            raise UserError(f"{stage}.grad_checkpointing: not for model.family {m.family}: "
                            f"{family.no_grad_checkpointing}; set it to false")
        if cfg.module_init not in ("random", "meta", "stack"):
            raise UserError(f"{stage}.module_init must be random, meta or stack, got {cfg.module_init!r}")
        if cfg.decay_milestones is not None and not all(
                isinstance(e, int) and not isinstance(e, bool) and 0 < e for e in cfg.decay_milestones):
            raise UserError(f"{stage}.decay_milestones must be a list of positive epochs, got {cfg.decay_milestones}")
        if cfg.amp not in ("none", "bf16", "fp16"):
            raise UserError(f"{stage}.amp must be none, bf16 or fp16, got {cfg.amp!r}")
        if cfg.max_nonfinite_skips < 0:
            raise UserError(f"{stage}.max_nonfinite_skips must be >= 0, got {cfg.max_nonfinite_skips}")
        if cfg.checkpoint_every < 0 or cfg.checkpoint_minutes < 0:
            raise UserError(f"{stage}.checkpoint_every (optimizer updates) and {stage}.checkpoint_minutes must be "
                            f">= 0 (0: save only at the end of each epoch), got {cfg.checkpoint_every} and "
                            f"{cfg.checkpoint_minutes}")
        if cfg.epochs < 0 or cfg.batch_size < 1 or cfg.accum_steps < 1:
            raise UserError(f"{stage}: epochs >= 0, batch_size >= 1 and accum_steps >= 1 are required")
        _validate_budget(stage, cfg, getattr(family, "task", "classification") == "causal_lm")
    _validate_tokenizer(recipe.data, family, m.family)
    if recipe.data.eval_tokens < 0:
        raise UserError(f"data.eval_tokens must be >= 0 (0: the whole held-out split), got {recipe.data.eval_tokens}")
    if (recipe.data.eval_tokens or recipe.data.cache_dir) and getattr(family, "task", "classification") != "causal_lm":
        raise UserError("data.eval_tokens and data.cache_dir are for text; remove them for a model that classifies "
                        "images (train.eval_every evaluates on the whole test set)")
    if not recipe.data.text_column:
        raise UserError("data.text_column must name the column of text of jsonl:, parquet: or hf_disk: records, got ''")
    if recipe.data.on_bad_image not in ("stop", "skip"):
        raise UserError(f"data.on_bad_image must be stop or skip, got {recipe.data.on_bad_image!r}")
    _validate_augment(recipe.data)
    lc = recipe.launch
    if lc.devices_per_job < 0 or lc.cpus_per_job < 0 or lc.retries < 0:
        raise UserError("launch.devices_per_job, launch.cpus_per_job and launch.retries must be >= 0")
    if not 0 < recipe.data.train_fraction <= 1:
        raise UserError(f"data.train_fraction must be in (0, 1], got {recipe.data.train_fraction}")


TOKENIZERS = ("byte", "bpe")


def _validate_budget(stage: str, cfg: TrainCfg, text: bool) -> None:
    for key in ("tokens", "warmup_tokens", "eval_every"):
        if getattr(cfg, key) < 0:
            raise UserError(f"{stage}.{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.tokens and not text:
        raise UserError(f"{stage}.tokens is a budget in text tokens, but the model classifies images; give "
                        f"{stage}.epochs instead")
    if cfg.tokens and cfg.warmup_epochs:
        raise UserError(f"{stage}.warmup_epochs {cfg.warmup_epochs} with a budget in tokens: give the warm-up as "
                        f"{stage}.warmup_tokens instead")
    if cfg.warmup_tokens and not cfg.tokens:
        raise UserError(f"{stage}.warmup_tokens is the warm-up of a budget in tokens, but {stage} trains for "
                        f"epochs; use {stage}.warmup_epochs, or set {stage}.tokens")
    if cfg.warmup_tokens > cfg.tokens:
        raise UserError(f"{stage}.warmup_tokens {cfg.warmup_tokens} exceeds the budget of {cfg.tokens} tokens")


def _validate_tokenizer(data: DataCfg, family, family_name: str) -> None:
    if data.tokenizer not in TOKENIZERS:
        raise UserError(f"data.tokenizer must be byte or bpe, got {data.tokenizer!r}")
    if data.tokenizer == "byte":
        return
    if getattr(family, "task", "classification") != "causal_lm":
        raise UserError(f"data.tokenizer: {data.tokenizer} tokenizes text for a language model, but model.family "
                        f"'{family_name}' classifies images; remove data.tokenizer or use model.family causal_lm")
    if data.vocab_size <= 256:
        raise UserError(f"data.vocab_size must be more than 256 with data.tokenizer: bpe (the 256 byte tokens and "
                        f"at least one merge), got {data.vocab_size}; or use data.tokenizer: byte")


def _validate_augment(data: DataCfg) -> None:
    aug = data.augment
    if data.repeated_aug < 1:
        raise UserError(f"data.repeated_aug must be >= 1 (1 = off, 3 = DeiT), got {data.repeated_aug}")
    if aug.color_jitter is not None and aug.color_jitter < 0:
        raise UserError(f"data.augment.color_jitter must be >= 0 (0 = off), got {aug.color_jitter}")
    if aug.color_jitter and aug.auto_augment:
        raise UserError(f"data.augment.color_jitter {aug.color_jitter} with auto_augment {aug.auto_augment!r}: "
                        f"timm leaves ColorJitter out when auto_augment is set; drop one of the two keys")
    if aug.interpolation not in ("bicubic", "bilinear", "nearest"):
        raise UserError(f"data.augment.interpolation must be bicubic, bilinear or nearest, got {aug.interpolation!r}")
    if aug.re_mode not in ("pixel", "rand", "const"):
        raise UserError(f"data.augment.re_mode must be pixel, rand or const, got {aug.re_mode!r}")
    if aug.re_count < 1:
        raise UserError(f"data.augment.re_count must be >= 1, got {aug.re_count}")
    if aug.crop_pct is not None and not 0 < aug.crop_pct <= 1:
        raise UserError(f"data.augment.crop_pct must be in (0, 1] (or unset), got {aug.crop_pct}")


def dump_recipe(recipe: Recipe) -> str:
    raw = recipe.to_dict()
    if raw["train"]["tokens"]:      # the budget is in tokens: the default epochs would read as a second budget
        del raw["train"]["epochs"]
    return yaml.safe_dump(raw, sort_keys=False)
