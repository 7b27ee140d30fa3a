"""parallel.py and sharded.py in one process: FSDP over a group of one, the sharded checkpoint's
atomic publish (a killed write leaves the previous checkpoint usable), and the CUDA defaults."""
import shutil

import pytest
import torch
import torch.distributed as tdist
from torch import nn

from incubate.store import sharded
from incubate.train.dist import Dist
from incubate.errors import UserError
from incubate.train.parallel import Trainee, full_state, gpu_defaults, shard
from incubate.train.step import clip_sharded


class Blocks:
    """A family adapter's one method fsdp needs."""
    name = "blocks"

    def block_modules(self, model):
        return list(model[:-1])


def _trained(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    shard(Trainee.whole(model, Blocks()), "none", torch.device("cpu"))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _step(model, optimizer):
    model(torch.ones(3, 4)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.fixture
def group_of_one():
    yield
    if tdist.is_initialized():
        tdist.destroy_process_group()


def test_a_killed_write_leaves_the_previous_sharded_checkpoint_usable(tmp_path, group_of_one):
    model, opt = _trained(0)
    path, dist = sharded.folder(tmp_path), Dist()
    _step(model, opt)
    sharded.save(path, model, opt, {"epoch": 0}, dist)
    first = {k: v.clone() for k, v in full_state(model).items()}
    _step(model, opt)
    sharded.save(path, model, opt, {"epoch": 1}, dist)
    assert sharded.newest(path) == path and sharded.complete(tmp_path / sharded.PREVIOUS)

    (tmp_path / (sharded.NAME + ".tmp")).mkdir()        # a write killed before its rename: ignored
    assert sharded.newest(path) == path
    path.rename(tmp_path / "gone")      # killed between the renames: the previous one is taken
    shutil.rmtree(tmp_path / sharded.PREVIOUS)
    (tmp_path / "gone").rename(tmp_path / sharded.PREVIOUS)
    assert sharded.newest(path) == tmp_path / sharded.PREVIOUS

    fresh, fresh_opt = _trained(1)
    assert sharded.load(sharded.newest(path), fresh, fresh_opt)["epoch"] == 1
    assert all(torch.equal(full_state(fresh)[k], v) for k, v in full_state(model).items())
    assert not all(torch.equal(full_state(fresh)[k], v) for k, v in first.items())


def test_a_sharded_checkpoint_of_another_model_is_one_line_and_loads_nothing(tmp_path, group_of_one):
    model, opt = _trained(0)
    sharded.save(sharded.folder(tmp_path), model, opt, {"epoch": 0}, Dist())
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    shard(Trainee.whole(other, Blocks()), "none", torch.device("cpu"))
    before = {k: v.clone() for k, v in full_state(other).items()}
    with pytest.raises(UserError, match=r"holds another model than this recipe trains \(2 weights differ, e\.g\. 2\.bias\)"):
        sharded.load(sharded.folder(tmp_path), other, torch.optim.AdamW(other.parameters()))
    assert all(torch.equal(full_state(other)[k], v) for k, v in before.items())


def test_clipping_sharded_gradients_matches_clip_grad_norm(group_of_one):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    model, _ = _trained(0)     # the same initial weights, sharded
    for m in (plain, model):
        m(torch.ones(3, 4)).square().sum().backward()
    want = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
    got = clip_sharded([p for p in model.parameters()], 0.5)
    torch.testing.assert_close(got, want)
    for p, q in zip(plain.parameters(), model.parameters()):
        torch.testing.assert_close(q.grad.full_tensor(), p.grad)


@pytest.fixture
def cuda_settings():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1:]


def test_tf32_and_cudnn_autotuning_on_cuda_in_fp32_only(cuda_settings):
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = False
    for device, amp, deterministic in (("cpu", "none", False), ("cuda", "bf16", False), ("cuda", "none", True)):
        assert gpu_defaults(torch.device(device), amp, deterministic) == {}
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.benchmark
    applied = gpu_defaults(torch.device("cuda", 0), "none")
    assert applied["cudnn.benchmark"] and torch.backends.cudnn.benchmark
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32


def test_fsdp_in_one_process_trains_a_hybrid_as_ddp_does(tmp_path, group_of_one):
    """Accumulation (set_requires_gradient_sync), clipping of sharded gradients, mixup, eval_every and
    grad checkpointing under fsdp: the weights of the same fit without it; the meta model untouched."""
    from incubate.recipe.schema import DataCfg, TrainCfg
    from incubate.data.loaders import load_data
    from incubate.train.engine import fit
    from incubate.train.step import StageRun
    from .test_engine import hybrid
    data = DataCfg(source="digits", img_size=8, train_fraction=0.05)      # 5 steps: fsdp's DTensors are slow on tiny CPU models
    nets = {}
    for parallel in ("ddp", "fsdp"):
        (tmp_path / parallel).mkdir()
        net = nets[parallel] = hybrid(1)
        cfg = TrainCfg(epochs=1, batch_size=16, accum_steps=2, lr=2e-3, lr_base_batch=32, clip_grad=0.5, mixup=0.2,
                       eval_every=2, grad_checkpointing=True, parallel=parallel)
        fit(net.trainee(), cfg, load_data(data), data, StageRun(Dist(), 0, tmp_path / parallel, "t"))
    from incubate.train.parallel import full_state
    want, got = nets["ddp"].runner.model.state_dict(), full_state(nets["fsdp"].runner.model)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    assert all(not isinstance(p, torch.distributed.tensor.DTensor) for p in nets["fsdp"].meta.parameters())
    assert (tmp_path / "fsdp/checkpoint.dcp/state.json").exists()      # its epoch-end checkpoint, sharded
