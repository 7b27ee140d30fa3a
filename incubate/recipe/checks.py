"""Checks of a recipe that span keys (or need the model family); each key's own type, choices and
bounds are declared in incubate/recipe/schema.py and checked as the recipe is read."""
from __future__ import annotations

from ..errors import UserError


def validate(recipe, stages, family_checks: bool = True) -> None:
    """Refuse, in one line, a recipe whose keys disagree; `stages` are the sections of overrides.
    family_checks=False leaves out what needs the family's adapter imported (its model keys)."""
    m = recipe.model
    if len(recipe.meta_division) != len(m.division):
        raise UserError(f"model.meta_division has {len(recipe.meta_division)} modules but "
                        f"model.division has {len(m.division)}; give both the same K")
    from ..families import get_family
    from ..tasks import modality_of
    text = modality_of(m.family) == "text"
    family = get_family(m.family) if family_checks else None      # imports timm or transformers
    if family is not None:
        family.validate(m)
    for stage in stages:
        _validate_stage(stage, recipe.stage(stage), family, m.family, text)
    _validate_tokenizer(recipe.data, text, m.family)
    if (recipe.data.eval_tokens or recipe.data.cache_dir) and not text:
        raise UserError("data.eval_tokens and data.cache_dir are for text; remove them for a model that classifies "
                        "images (train.eval_every evaluates on the whole test set)")
    if not recipe.data.text_column:
        raise UserError("data.text_column must name the column of text of jsonl:, parquet: or hf_disk: records, got ''")
    _validate_loader(recipe.data)
    aug = recipe.data.augment
    if aug.color_jitter and aug.auto_augment:
        raise UserError(f"data.augment.color_jitter {aug.color_jitter} with auto_augment {aug.auto_augment!r}: "
                        f"timm leaves ColorJitter out when auto_augment is set; drop one of the two keys")


def _validate_stage(stage: str, cfg, family, family_name: str, text: bool) -> None:
    if family is not None:
        from ..train.parallel import check_fsdp
        check_fsdp(cfg, family, f"{stage}.parallel")
    if cfg.grad_checkpointing and getattr(family, "no_grad_checkpointing", None):
        raise UserError(f"{stage}.grad_checkpointing: not for model.family {family_name}: "
                        f"{family.no_grad_checkpointing}; set it to false")
    if cfg.tokens and not text:
        raise UserError(f"{stage}.tokens is a budget in text tokens, but the model classifies images; give "
                        f"{stage}.epochs instead")
    if cfg.tokens and cfg.warmup_epochs:
        raise UserError(f"{stage}.warmup_epochs {cfg.warmup_epochs} with a budget in tokens: give the warm-up as "
                        f"{stage}.warmup_tokens instead")
    if cfg.warmup_tokens and not cfg.tokens:
        raise UserError(f"{stage}.warmup_tokens is the warm-up of a budget in tokens, but {stage} trains for "
                        f"epochs; use {stage}.warmup_epochs, or set {stage}.tokens")
    if cfg.sched == "rsqrt" and not (cfg.warmup_epochs or cfg.warmup_tokens):
        raise UserError(f"{stage}.sched rsqrt decays over the warm-up's length, and {stage} has none; set "
                        f"{stage}.warmup_epochs (or warmup_tokens), or use another sched")
    if cfg.warmup_tokens > cfg.tokens:
        raise UserError(f"{stage}.warmup_tokens {cfg.warmup_tokens} exceeds the budget of {cfg.tokens} tokens")


def _validate_tokenizer(data, text: bool, family_name: str) -> None:
    if data.tokenizer == "byte":
        return
    if not text:
        raise UserError(f"data.tokenizer: {data.tokenizer} tokenizes text for a language model, but model.family "
                        f"'{family_name}' classifies images; remove data.tokenizer or use model.family causal_lm")
    if data.vocab_size <= 256:
        raise UserError(f"data.vocab_size must be more than 256 with data.tokenizer: bpe (the 256 byte tokens and "
                        f"at least one merge), got {data.vocab_size}; or use data.tokenizer: byte")


def _validate_loader(data) -> None:
    """Keys of the data that only make sense together (torch's DataLoader would refuse some mid-stage)."""
    if data.persistent_workers and not data.num_workers:
        raise UserError("data.persistent_workers keeps DataLoader workers alive, but data.num_workers is 0 (no "
                        "workers); set data.num_workers >= 1 or persistent_workers: false")
    if data.augment.shift >= data.img_size:
        raise UserError(f"data.augment.shift {data.augment.shift} moves images by their whole size "
                        f"(data.img_size {data.img_size}) or more; use a shift below the image size")
