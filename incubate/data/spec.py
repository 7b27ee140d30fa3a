"""What a data set is, declared: one typed description a modality, which the family (its model's
input and output sizes) and the task read, so that nothing tells images from text by probing a
bundle's attributes.

Both name the size of the model's output layer `outputs` (the classes of an image, the vocabulary
a text position predicts from) and what a manifest records of it (`manifest_fields`: the keys
`classes` and `num_classes`, as every run directory since the first has them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import UserError


@dataclass(frozen=True)
class ImageSpec:
    """Images: `channels` x `size` x `size` inputs, one of `class_names` each."""
    channels: int
    size: int
    class_names: tuple
    modality: ClassVar[str] = "image"

    @classmethod
    def unnamed(cls, channels: int, size: int, classes: int) -> "ImageSpec":
        """A spec whose classes are known only by their count (`incubate plan --classes N`)."""
        return cls(channels, size, tuple(str(i) for i in range(classes)))

    @property
    def classes(self) -> int:
        return len(self.class_names)

    @property
    def outputs(self) -> int:
        return self.classes

    def manifest_fields(self) -> dict:
        return {"classes": list(self.class_names), "num_classes": self.classes}


@dataclass(frozen=True)
class TextSpec:
    """Text: windows of `context` tokens of a `vocab_size` vocabulary (`tokenizer` byte or bpe; a BPE
    tokenizer's file digest in `tokenizer_sha256`, empty for bytes)."""
    context: int
    vocab_size: int
    tokenizer: str = "byte"
    tokenizer_sha256: str = ""
    modality: ClassVar[str] = "text"

    @property
    def outputs(self) -> int:
        return self.vocab_size

    def manifest_fields(self) -> dict:
        return {"classes": [], "num_classes": self.vocab_size}


def expect(spec, modality: str, family: str) -> None:
    """Refuse, in one line, a spec of another modality than the family `family` models."""
    if getattr(spec, "modality", None) != modality:
        got = getattr(spec, "modality", type(spec).__name__)
        raise UserError(f"the {family} family builds {modality} models but was handed a description of {got} data "
                        f"({type(spec).__name__}); pass a {'TextSpec' if modality == 'text' else 'ImageSpec'} "
                        f"(incubate.data.spec)")
