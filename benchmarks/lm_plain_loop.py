"""A plain PyTorch loop over the token study's Llama, outside incubate: is the e2e stage's slow start ours?

It reads the study's token cache (train.bin / test.bin of benchmarks/token_study.py's corpus), trains
transformers' LlamaForCausalLM with torch's AdamW and a cosine schedule, and prints validation bits per
byte on 512 windows spread evenly over the held-out split every 50 updates, to set beside the e2e
stage's eval rows at the same update (docs/results.md, pre-training in tokens).

    python -m benchmarks.lm_plain_loop --cache /root/incubate-runs/accuracy_vs_cost/token_cache --updates 150
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CONTEXT, BATCH, EVAL_WINDOWS = 128, 32, 512


def model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                        intermediate_size=176, num_hidden_layers=layers, vocab_size=256,
                                        max_position_embeddings=CONTEXT, tie_word_embeddings=False, use_cache=False))


def windows(tokens: np.ndarray, starts) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack([tokens[s:s + CONTEXT + 1] for s in starts]).astype(np.int64))
    return x[:, :-1], x[:, 1:]


@torch.no_grad()
def bits_per_byte(net, test: np.ndarray) -> float:
    net.eval()
    starts = np.linspace(0, len(test) - CONTEXT - 1, EVAL_WINDOWS).astype(np.int64)
    nats, n = 0.0, 0
    for i in range(0, EVAL_WINDOWS, 64):
        x, y = windows(test, starts[i:i + 64])
        nats += F.cross_entropy(net(x).logits.reshape(-1, 256), y.reshape(-1), reduction="sum").item()
        n += y.numel()
    net.train()
    return nats / n / math.log(2)       # byte tokens: a token is a byte


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, required=True, help="a token_cache folder (its one entry is read)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--updates", type=int, default=150)
    p.add_argument("--schedule-updates", type=int, default=1128, help="the cosine's length (E2E at 30 TFLOPs)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01, help="torch AdamW's default")
    p.add_argument("--clip", type=float, default=0.0, help="0: no clipping")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)
    entry = next(d for d in sorted(a.cache.iterdir()) if (d / "train.bin").exists())
    train = np.memmap(entry / "train.bin", dtype=np.uint8, mode="r")
    test = np.memmap(entry / "test.bin", dtype=np.uint8, mode="r")
    net = model(a.layers)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / a.schedule_updates)))
    rng, t0 = np.random.default_rng(a.seed), time.time()
    for update in range(1, a.updates + 1):
        x, y = windows(train, rng.integers(0, len(train) - CONTEXT - 1, BATCH))
        loss = F.cross_entropy(net(x).logits.reshape(-1, 256), y.reshape(-1))
        loss.backward()
        if a.clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), a.clip)
        opt.step()
        opt.zero_grad()
        sched.step()
        if update % 50 == 0:
            print(f"layers {a.layers} update {update} train {loss.item() / math.log(2):.3f} "
                  f"val_bpb {bits_per_byte(net, test):.3f} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
