"""Image classification: a batch is (images, labels); loss cross-entropy (timm's mixup/cutmix and
label smoothing in training); metrics top-1 accuracy and loss; headline top-1, higher is better."""
from __future__ import annotations

# torch is imported where a method needs it: `incubate status` and `report` read a task without it


class ClassificationTask:
    name = "classification"
    modality = "image"              # the data it reads (incubate/data/spec.py)
    summary = "classifies images"   # what a family of this task does, in a refusal
    use = "use an image source (digits, idx:, imagefolder:, cifar10:, cifar100:)"    # how to give it that data
    headline = "top1"               # the metric a run is judged by
    higher_is_better = True
    headline_label = "test top-1 (%)"
    headline_text = "top-1 {:.2f}%"    # one value in a line of `incubate status`
    columns = (("top1", "top-1 (%)", "{:.2f}"),)     # the report table's metric columns: key, header, format

    def criteria(self, cfg, bundle):
        """(batch transform or None, training loss, loss for counting FLOPs): timm's mixup/cutmix and
        label smoothing. FLOPs are counted with plain cross-entropy on hard labels."""
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from torch import nn
        if cfg.mixup > 0 or cfg.cutmix > 0:
            mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                          num_classes=bundle.spec.classes)
            return mixup, SoftTargetCrossEntropy(), nn.CrossEntropyLoss()
        if cfg.label_smoothing > 0:
            criterion = LabelSmoothingCrossEntropy(cfg.label_smoothing)
        else:
            criterion = nn.CrossEntropyLoss()
        return None, criterion, criterion

    def eval_sums(self, out, y) -> torch.Tensor:
        """Summed loss, correct predictions and samples of one batch (float64, summed over ranks)."""
        import torch
        import torch.nn.functional as F
        return torch.stack([F.cross_entropy(out.float(), y, reduction="sum").double(),
                            (out.argmax(-1) == y).sum().double(), torch.tensor(float(len(y)), dtype=torch.float64,
                                                                             device=out.device)])

    def metrics(self, sums: torch.Tensor, bundle) -> dict:
        n = max(sums[2].item(), 1.0)
        return {"top1": 100.0 * sums[1].item() / n, "loss": sums[0].item() / n, "n": int(sums[2].item())}

    def row(self, m: dict) -> dict:
        """metrics.jsonl columns of an evaluation."""
        return {"test_top1": m["top1"], "test_loss": m["loss"]}

    def final(self, m: dict) -> dict:
        """What a manifest's `metrics` holds."""
        return {"top1": m["top1"], "loss": m["loss"]}

    def text(self, m: dict) -> str:
        return f"test top-1 {m['top1']:.2f}%"
