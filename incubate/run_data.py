"""A run directory's data for a script, exactly as the CLI's stages read it: the recipe saved in
RUN/recipe.yaml, its data source read by the same functions (data.load_data: the same split, the
same tokenizer, RUN/tokenizer.json for BPE, the same token cache), so that a loop of one's own
trains on the run's training split and never on its held-out text."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .errors import UserError


class Windows(Dataset):
    """One split's token windows as transformers' Trainer takes them: `input_ids` the window less its
    last token, `labels` the window less its first (the next token at every position, aligned: the
    hybrid's loss does not shift them), the stages' (inputs, targets)."""

    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        w = self.split.windows(torch.tensor([i]))[0]
        return {"input_ids": w[:-1], "labels": w[1:]}


class Images(Dataset):
    """One split's images as the stages evaluate them (the eval transform, no augmentation):
    `pixel_values` the model's input, `labels` the class. Training augmentation is per batch in the
    stages' loader (`RunData.loader`) or per image in `RunData.transform(train=True)`."""

    def __init__(self, bundle, split, augment):
        from .data.loaders import image_transform
        self.bundle, self.split = bundle, split
        self.transform = image_transform(bundle, augment, train=False) if split.images is None else None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        from .data.loaders import _prepare
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self.transform is None:      # in memory: resized and normalised as the stages' loader does
            x = _prepare(self.split.images[i:i + 1], self.bundle.spec.size, self.bundle.mean, self.bundle.std)[0]
        else:
            from PIL import Image
            x = self.transform(Image.open(self.split.files[i]).convert("RGB"))
        return {"pixel_values": x, "labels": int(self.split.labels[i])}


@dataclass
class RunData:
    """What `incubate.run_data(run)` gives: the run's recipe and data bundle; its training and held-out
    datasets (text: `Windows`, with the tokenizer, a tokenizers.Tokenizer or None for byte tokens:
    token i is byte i; images: `Images`, with `transform`); `loader` gives the stages' own batches."""
    recipe: object
    bundle: object
    tokenizer: object = None
    train: Dataset | None = None
    held_out: Dataset | None = None

    @property
    def text(self) -> bool:
        return self.bundle.spec.modality == "text"

    def transform(self, train: bool = True):
        """The timm transform the stages apply to an image file (training: with the recipe's augmentation)."""
        from .data.loaders import image_transform
        if self.text:
            raise UserError("a language model's run has no image transform; its windows are token ids")
        return image_transform(self.bundle, self.recipe.data.augment, train)

    def loader(self, split: str = "train", batch: int | None = None, seed: int = 0, device: str = "cpu"):
        """The loader a stage builds (one process): `epoch(e)` yields (inputs, targets) batches of
        `batch` (default the recipe's train.batch_size), training order and augmentation included."""
        from .data.loaders import make_loader
        from .data.order import Reader
        if split not in ("train", "held_out"):
            raise UserError(f"split {split!r} is neither 'train' nor 'held_out'")
        part = self.bundle.train if split == "train" else self.bundle.test
        return make_loader(self.bundle, part, self.recipe.data,
                           Reader(batch or self.recipe.train.batch_size, split == "train", seed, 0, 1, device))


def run_data(run) -> RunData:
    """The data of run directory `run` (made by any `incubate` stage) as its stages read it."""
    from .recipe.schema import load_recipe
    from .data.loaders import load_data
    run = Path(run)
    if not (run / "recipe.yaml").exists():
        raise UserError(f"{run} holds no recipe.yaml: run a stage first (e.g. `incubate meta --recipe R --out {run}`)")
    recipe = load_recipe(run / "recipe.yaml", family_checks=False)
    bundle = load_data(recipe.data, run, train_tokenizer=False)
    if bundle.spec.modality != "text":
        aug = recipe.data.augment
        return RunData(recipe, bundle, None, Images(bundle, bundle.train, aug), Images(bundle, bundle.test, aug))
    tokenizer = None
    if bundle.spec.tokenizer != "byte":
        from .data.bpe import RESTORE, TOKENIZER_FILE, read_tokenizer
        tokenizer, _ = read_tokenizer(run / TOKENIZER_FILE, bundle.spec.vocab_size, RESTORE)
    return RunData(recipe, bundle, tokenizer, Windows(bundle.train), Windows(bundle.test))
