"""Under torchrun: several CLI commands in one pair of ranks, so that the tests pay torch's imports and
the process group's start once (tests/integration/test_fsdp.py).

    torchrun ... -m tests.integration.fsdp_runs '[["run", "--recipe", R, "--out", O], {"argv": [...], "stop": true}]'

A command given as {"argv": ..., "stop": true} stops on every rank right after its stage's first
mid-epoch checkpoint (as a kill there would); {"argv": ..., "dump": PATH} writes what a resume from a
sharded checkpoint restored (the gathered model and optimizer state) and the update counts at the
resume and at the stage's end to PATH. The same hooks serve the tests' commands in one process.
"""
import contextlib
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from incubate.cli import dispatch, parser
from incubate.store import lock, resume, sharded
from incubate.train import engine
from incubate.train.dist import close_dist


class Stopped(Exception):
    """Raised on every rank right after a stage's first mid-epoch checkpoint."""


@contextlib.contextmanager
def patched(owner, name: str, replacement):
    original = getattr(owner, name)
    setattr(owner, name, replacement(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def stop_after_first_save():
    def wrap(original):
        def save_then_stop(self, *args, **kwargs):
            original(self, *args, **kwargs)
            raise Stopped()
        return save_then_stop
    return patched(resume.Checkpointer, "save_mid_epoch", wrap)


@contextlib.contextmanager
def dump_restored(path: str):
    """What sharded.load restored, gathered onto rank 0, and the updates at the resume and at the end."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    out = {}

    def wrap_load(original):
        def load_and_gather(where, model, optimizer):
            state = original(where, model, optimizer)
            gathered = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
            out["model"], out["optim"] = copy.deepcopy(gathered)     # the optimizer's step counts move on
            return state
        return load_and_gather

    def wrap_restore(original):
        def restore(self, *args):
            pos = original(self, *args)
            out["resumed_at"], out["lr"] = pos.num_updates, self.tr.optimizer.param_groups[0]["lr"]
            return pos
        return restore

    def wrap_summary(original):
        def summary(s, metrics):
            out["ended_at"] = s.pos.num_updates
            return original(s, metrics)
        return summary

    with patched(sharded, "load", wrap_load), patched(resume.Checkpointer, "restore", wrap_restore), \
            patched(engine, "summary", wrap_summary):
        yield
    if not tdist.is_initialized() or tdist.get_rank() == 0:
        torch.save(out, path)


def run(entry) -> None:
    """One command of the list: a plain argv, or a dict with its hooks."""
    if isinstance(entry, list):
        entry = {"argv": entry}
    hooks = dump_restored(entry["dump"]) if "dump" in entry else contextlib.nullcontext()
    with hooks, (stop_after_first_save() if entry.get("stop") else contextlib.nullcontext()):
        try:
            dispatch(parser().parse_args(entry["argv"]))
        except Stopped:     # as a killed process would, it lets go of its stage's lock
            for held in list(lock._held):
                lock.release(Path(held).parent)


def in_one_process(entry) -> None:
    """run(entry) in the tests' process, leaving the process group of one that fsdp made, as main does."""
    run(entry)
    close_dist(True)


if __name__ == "__main__":
    for item in json.loads(sys.argv[1]):
        run(item)
    close_dist(True)
