"""A torchrun-style worker that meets one fault on rank 1 only, then runs the CLI as usual.

    python -m tests.integration.rank_fault nan|raise|backward|nangrad|step|none|slow-restart STAMP incubate-args...

nan: rank 1's loss becomes NaN from its 2nd training step on; raise: rank 1's 2nd step raises a
RuntimeError in the loss; backward: in its backward; nangrad: its 2nd step's backward gives NaN
gradients (the loss stays finite); step: rank 1's 2nd optimizer.step raises (step:N: its Nth); none: no patch (the
test brings the fault, e.g. a corrupt image in rank 1's shard).
The moment rank 1 meets the fault is written to STAMP (time.time()), so the test can measure how
long every rank takes to stop after it; whether each rank left the process group when the CLI
returned is written to STAMP.group.RANK ("left" or "joined"), and the names of gloo's threads still
running then to STAMP.threads.RANK (empty when the group is really gone).
"""
import os
import sys
import time

import timm.loss
import torch


def _patch(fault: str, stamp: str) -> None:
    if fault == "slow-restart":
        # rank 1 of a restarted group comes up late (as on a loaded machine): rank 0 must not meet
        # the address the previous group's rank 1 left in torchrun's store
        if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            time.sleep(4)
        return
    if fault == "none" or os.environ.get("RANK") != "1":
        return
    calls = []
    if fault.split(":")[0] == "step":
        nth = int(fault.split(":")[1]) if ":" in fault else 2

        def fail_second_step(optimizer, args, kwargs):
            calls.append(1)
            if len(calls) == nth:
                _stamp(stamp)
                raise RuntimeError("injected fault in optimizer.step on rank 1")
        from torch.optim.optimizer import register_optimizer_step_pre_hook
        register_optimizer_step_pre_hook(fail_second_step)
        return

    class Faulty(timm.loss.LabelSmoothingCrossEntropy):
        def forward(self, x, target):
            loss = super().forward(x, target)
            calls.append(1)
            if len(calls) < 3:      # the 1st call measures FLOPs, the 2nd is training step 1
                return loss
            if fault in ("backward", "nangrad"):
                return _FaultyBackward.apply(loss, fault, stamp)
            _stamp(stamp)
            if fault == "raise":
                raise RuntimeError("injected fault on rank 1")
            return loss * float("nan")

    timm.loss.LabelSmoothingCrossEntropy = Faulty


def _stamp(stamp: str) -> None:
    with open(stamp, "w") as f:
        f.write(repr(time.time()))


class _FaultyBackward(torch.autograd.Function):
    """The identity forward; its backward raises, or hands on NaN gradients."""

    @staticmethod
    def forward(ctx, loss, fault, stamp):
        ctx.fault, ctx.stamp = fault, stamp
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        _stamp(ctx.stamp)
        if ctx.fault == "backward":
            raise RuntimeError("injected fault in backward on rank 1")
        return grad * float("nan"), None, None


def gloo_threads() -> list[str]:
    """gloo's worker and I/O threads still alive: they outlive destroy_process_group while anything
    still holds the group, and die in interpreter finalization, where they can abort the process."""
    names = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as f:
            names.append(f.read().strip())
    return sorted(n for n in names if "gloo" in n)


if __name__ == "__main__":
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1)     # a hung test can ask each rank where it is
    _patch(sys.argv[1], sys.argv[2])
    from incubate.cli import console_main
    rc = console_main(sys.argv[3:])
    if sys.argv[2] != "-":      # whether main left the process group before exiting (STAMP.group.RANK)
        import torch.distributed as tdist
        with open(f"{sys.argv[2]}.group.{os.environ.get('RANK', '0')}", "w") as f:
            f.write("joined" if tdist.is_initialized() else "left")
        with open(f"{sys.argv[2]}.threads.{os.environ.get('RANK', '0')}", "w") as f:
            f.write(" ".join(gloo_threads()))
    sys.exit(rc)
