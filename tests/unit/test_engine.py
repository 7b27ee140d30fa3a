"""Throughput options of the engine: grad checkpointing, bf16 and torch.compile change speed, not results."""
import json
import os
import time

import pytest
import timm
import torch

from incubate.recipe.schema import DataCfg, TrainCfg
from incubate.data.loaders import load_data
from incubate.train.dist import Dist
from incubate.train.engine import fit
from incubate.train.step import StageRun, enable_grad_checkpointing
from incubate.families import get_family
from incubate.modular import Hybrid

FAMILY = get_family("vit")
KW = dict(img_size=8, patch_size=4, embed_dim=16, num_heads=2, in_chans=1, num_classes=10)


def vit(depth, **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", depth=depth, **dict(KW, **kw))


def hybrid(index, div=(2, 2)):
    target = FAMILY.keep_only(vit(sum(div), drop_path_rate=0.1), list(div), index)
    return Hybrid(FAMILY, vit(len(div)), [1] * len(div), target, list(div), index)


def _loss_and_grads(net, trained, x, y):
    torch.manual_seed(1)          # same drop-path draws with and without recomputation
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in trained.named_parameters()}
    trained.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ["e2e", "hybrid0", "hybrid1"])
def test_grad_checkpointing_gives_the_same_loss_and_grads(kind):
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    if kind == "e2e":
        net = vit(4, drop_path_rate=0.1).train()
        trained = net
    else:
        net = hybrid(int(kind[-1])).train()
        trained = net.runner.model
    ref_loss, ref = _loss_and_grads(net, trained, x, y)
    seen = []
    hook = torch.utils.checkpoint.checkpoint
    try:         # count recomputed blocks: checkpointing must really be on
        def counting(*args, **kwargs):
            seen.append(1)
            return hook(*args, **kwargs)
        torch.utils.checkpoint.checkpoint = counting
        import incubate.families.vit as vit_mod
        vit_mod.checkpoint, old = counting, vit_mod.checkpoint
        enable_grad_checkpointing(net, trained)
        loss, grads = _loss_and_grads(net, trained, x, y)
    finally:
        torch.utils.checkpoint.checkpoint = hook
        vit_mod.checkpoint = old
    if kind != "e2e":       # the family's own checkpointing: target blocks + meta suffix blocks
        assert len(seen) == 2 + (1 if kind == "hybrid0" else 0)
    assert trained.grad_checkpointing
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def _fit(tmp_path, net, trained, **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = DataCfg(source="digits", img_size=8, train_fraction=0.2)
    bundle = load_data(data)
    cfg = TrainCfg(epochs=1, batch_size=32, lr=2e-3, lr_base_batch=32, **train)
    assert trained is net.runner.model
    return fit(net.trainee(), cfg, bundle, data, StageRun(Dist(), 0, tmp_path, "test"))


def test_bf16_autocast_trains_a_hybrid_on_cpu(tmp_path):
    h = hybrid(1)
    before = {k: v.clone() for k, v in h.meta.state_dict().items()}
    start = {k: v.clone() for k, v in h.runner.model.state_dict().items()}
    result = _fit(tmp_path, h, h.runner.model, amp="bf16")
    assert torch.isfinite(torch.tensor(result["metrics"]["loss"]))
    assert all(torch.equal(before[k], v) for k, v in h.meta.state_dict().items())
    assert any(not torch.equal(start[k], v) for k, v in h.runner.model.state_dict().items())
    assert all(v.dtype == torch.float32 for v in h.runner.model.state_dict().values())   # master weights


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("INCUBATE_TEST_COMPILE"),
                    reason="torch.compile on CPU takes minutes; set INCUBATE_TEST_COMPILE=1 to run")
def test_compiled_hybrid_trains_and_meta_stays_bitwise_frozen(tmp_path):
    h = hybrid(0)
    eager = hybrid(0)
    before = {k: v.clone() for k, v in h.meta.state_dict().items()}
    t0 = time.perf_counter()
    compiled = _fit(tmp_path / "compiled", h, h.runner.model, compile=True, drop_path=0.0)
    print(f"compiled fit: {time.perf_counter() - t0:.1f}s")
    reference = _fit(tmp_path / "eager", eager, eager.runner.model, drop_path=0.0)
    assert all(torch.equal(before[k], v) for k, v in h.meta.state_dict().items())
    assert all(p.grad is None for p in h.meta.parameters())
    # compiled and eager training of the same hybrid end at the same weights, up to fusion rounding
    for (k, a), b in zip(h.runner.model.state_dict().items(), eager.runner.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=k)
    assert abs(compiled["metrics"]["loss"] - reference["metrics"]["loss"]) < 1e-3


def test_fused_adamw_and_grad_checkpointing_through_fit(tmp_path):
    h = hybrid(0)
    start = {k: v.clone() for k, v in h.runner.model.state_dict().items()}
    result = _fit(tmp_path, h, h.runner.model, fused=True, grad_checkpointing=True)
    assert torch.isfinite(torch.tensor(result["metrics"]["loss"]))
    assert h.runner.model.grad_checkpointing and h.meta.grad_checkpointing
    assert any(not torch.equal(start[k], v) for k, v in h.runner.model.state_dict().items())


def test_multistep_schedule_divides_the_lr_by_10_at_each_milestone(tmp_path):
    """The CIFAR ResNet recipe's schedule (He et al. 2016): SGD with momentum, lr / 10 at given epochs."""
    h = hybrid(1)
    data = DataCfg(source="digits", img_size=8, train_fraction=0.1)
    cfg = TrainCfg(epochs=4, batch_size=32, lr=0.1, lr_base_batch=32, opt="momentum", sched="multistep",
                   decay_milestones=[2, 3], weight_decay=1e-4, label_smoothing=0.0)
    fit(h.trainee(), cfg, load_data(data), data, StageRun(Dist(), 0, tmp_path, "test"))
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.1, 0.01, 0.001, 0.001])


def _lm(attn_implementation):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
                         num_hidden_layers=2, vocab_size=64, max_position_embeddings=16, use_cache=False)
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config)


def test_step_flops_count_the_attention_matmuls_of_fused_cpu_attention():
    """FlopCounterMode has no formula for the CPU's fused attention kernel; the count must still
    include QK^T and AV: it equals the count of the same model with attention as explicit matmuls,
    and exceeds a bare FlopCounterMode count by exactly the attention's matmul FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from incubate.train.step import count_step_flops
    from incubate.tasks import get_task
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    fused, explicit = vit(2), vit(2)
    for block in explicit.blocks:
        block.attn.fused_attn = False
    ce = torch.nn.CrossEntropyLoss()
    counted = count_step_flops(fused, fused, ce, x, y)
    assert counted == count_step_flops(explicit, explicit, ce, x, y)
    with FlopCounterMode(display=False) as bare:
        ce(fused(x), y).backward()
    tokens, dim = (8 // 4) ** 2 + 1, 16
    # QK^T and AV (2 x tokens^2 x dim each), 2 blocks, batch 4, forward + backward (2x forward)
    assert counted - bare.get_total_flops() == 2 * 2 * tokens ** 2 * dim * 2 * 4 * 3
    _, loss, _ = get_task("causal_lm").criteria(TrainCfg(), None)
    ids = torch.randint(0, 64, (2, 16))
    sdpa, eager = _lm("sdpa"), _lm("eager")
    assert count_step_flops(sdpa, sdpa, loss, ids, ids) == count_step_flops(eager, eager, loss, ids, ids)
