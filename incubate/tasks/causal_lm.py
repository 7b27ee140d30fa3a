"""Causal language modelling: a batch is (input tokens, the same tokens shifted by one); loss
next-token cross-entropy; metrics validation loss (nats a token), bits per byte and next-token
accuracy; headline bits per byte, lower is better.

Bits per byte = total nats / ln 2 / UTF-8 bytes of the predicted held-out text (TextBundle.test_bytes:
the bytes the target tokens stand for, one a token for bytes, more for BPE): unlike loss a token, it
compares models whatever their tokenizer.
"""
from __future__ import annotations

# torch is imported where a method needs it: `incubate status` and `report` read a task without it

import math

from ..errors import UserError


def logits_of(out) -> torch.Tensor:
    """A Hugging Face model returns an output object, a module (hybrid) the logits themselves."""
    return getattr(out, "logits", out)


class _NextTokenLoss:
    def __init__(self, label_smoothing: float):
        self.label_smoothing = label_smoothing

    def __call__(self, out, y):
        import torch.nn.functional as F
        logits = logits_of(out)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                               label_smoothing=self.label_smoothing)


class CausalLMTask:
    name = "causal_lm"
    modality = "text"               # the data it reads (incubate/data/spec.py)
    summary = "is a language model"     # what a family of this task does, in a refusal
    use = "use text:PATH (a UTF-8 file or a folder of them)"        # how to give it that data
    headline = "bpb"
    higher_is_better = False
    headline_label = "validation bits per byte"
    headline_text = "bits/byte {:.4f}"
    columns = (("bpb", "val bits/byte", "{:.4f}"), ("loss", "val loss", "{:.4f}"), ("acc", "next-token acc (%)", "{:.2f}"))

    def criteria(self, cfg, bundle):
        if cfg.mixup > 0 or cfg.cutmix > 0:
            raise UserError("mixup and cutmix mix images; set train.mixup and train.cutmix to 0 for a language model")
        loss = _NextTokenLoss(cfg.label_smoothing)
        return None, loss, loss

    def eval_sums(self, out, y) -> torch.Tensor:
        import torch
        import torch.nn.functional as F
        logits = logits_of(out).float()
        nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        return torch.stack([nats.double(), (logits.argmax(-1) == y).sum().double(),
                            torch.tensor(float(y.numel()), dtype=torch.float64, device=logits.device)])

    def metrics(self, sums: torch.Tensor, bundle) -> dict:
        n = max(sums[2].item(), 1.0)
        nats = sums[0].item()
        return {"bpb": nats / math.log(2) / max(bundle.test_bytes, 1), "loss": nats / n,
                "acc": 100.0 * sums[1].item() / n, "n": int(sums[2].item())}

    def row(self, m: dict) -> dict:
        return {"test_bpb": m["bpb"], "test_loss": m["loss"], "test_acc": m["acc"]}

    def final(self, m: dict) -> dict:
        return {"bpb": m["bpb"], "loss": m["loss"], "acc": m["acc"]}

    def text(self, m: dict) -> str:
        return f"val bits/byte {m['bpb']:.4f} next-token acc {m['acc']:.2f}%"
