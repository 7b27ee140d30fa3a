"""Command line: one subcommand a stage. Bad input prints one line and exits 2 (--debug: traceback)."""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import select
import signal
import sys
import threading

from typing import Annotated

from . import console
from .recipe.schema import AtLeast0, AtLeast1, Seed, load_recipe
from .errors import UserError
from .stage_registry import ALL, ASSEMBLED, FINETUNE, META, by_command, names, whole_models
from .recipe.typed import Range, Text, coerce

# The command line's own values, checked by the recipe's mechanism (typed.py) before any command runs;
# the paths must name something (an empty --out would be the current folder).
Path_ = Annotated[str, Text(note="name a folder or a file")]
ARGS = {"module": AtLeast0, "jobs": AtLeast1, "retries": AtLeast0, "tokens": AtLeast1,
        "temperature": Annotated[float, Range(ge=0, note="0: greedy")], "seed": Seed, "recipe": Path_,
        "out": Path_, "to": Path_, "run": Path_, "checkpoint": Path_,
        "prompt": Annotated[str, Text(note="the text to continue")]}


def _common(p: argparse.ArgumentParser, out: bool = True) -> None:
    p.add_argument("--recipe", required=True, help="recipe YAML file (see recipes/)")
    if out:
        p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.lr=1e-3 (repeatable)")


# a stage's options beside --out (stage_registry.Stage.args): what its main takes after the recipe
_STAGE_OPTIONS = {"module": dict(type=int, help="module index, 0..K-1"),
                  "checkpoint": dict(help="a stage folder or its model.safetensors")}


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-memory", default="80GiB", help="memory of one device (default 80GiB)")
    p.add_argument("--devices-per-node", type=int, default=8)
    p.add_argument("--device-tflops", type=float, default=989.0, help="peak TFLOP/s of a device (default: H100 bf16)")
    p.add_argument("--mfu", type=float, default=0.4, help="share of the peak a step reaches, in (0, 1]")
    p.add_argument("--classes", type=int, help="image recipes: classes (plan reads no data)")
    p.add_argument("--train-samples", type=int, help="training samples an epoch, to price epoch budgets")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="incubate", description="Deep Model Assembling / Deep Incubation")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for stage in ALL:        # one subcommand a stage, the registry's options
        p = sub.add_parser(stage.command, help=stage.help)
        _common(p, out="out" in stage.args)
        for name in stage.args:
            if name != "out":
                p.add_argument(f"--{name}", required=True, **_STAGE_OPTIONS[name])
    p = sub.add_parser("run", help="every stage in order, skipping finished ones")
    _common(p)
    p.add_argument("--no-e2e", action="store_true", help="skip the E2E baseline")
    p.add_argument("--grow", action="store_true", help="also the growth baseline (G_stack) from the meta model")
    p.add_argument("--launcher", choices=("local", "ray", "slurm"),
                   help="run each stage as its own job and the K module jobs in parallel "
                        "(default: every stage in this process, one after another)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="module jobs at once (with --launcher)")
    p.add_argument("--retries", type=int, metavar="R", help="tries again a failed job R times "
                   "(default: the recipe's launch.retries)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    p = sub.add_parser("import-official", help="an official Deep-Incubation checkpoint as a finished stage")
    p.add_argument("checkpoint", help="the .pth file the official code saved")
    _common(p)
    p.add_argument("--as", dest="as_", required=True, choices=(META, ASSEMBLED), help="the stage it becomes")
    p = sub.add_parser("export", help="a finished stage as a timm/hub folder, or a transformers folder for a "
                       "language model (model.safetensors + config.json, and the tokenizer with BPE)")
    p.add_argument("run", help="run directory")
    p.add_argument("--stage", required=True, choices=names(weights="target"))
    p.add_argument("--to", required=True, help="folder to write")
    p = sub.add_parser("sample", help="a language model's continuation of a prompt")
    p.add_argument("run", help="run directory")
    p.add_argument("--stage", default=FINETUNE, choices=whole_models())
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--tokens", type=int, default=200, metavar="N", help="tokens to write (bytes, or BPE tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: seeded sampling")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p = sub.add_parser("plan", help="what every stage and module job needs (memory a device under DDP and FSDP, "
                       "FLOPs, GPU-hours) before any GPU is rented; nothing is trained or allocated")
    _common(p, out=False)
    _plan_options(p)
    p = sub.add_parser("report", help="table of every stage and report.png")
    p.add_argument("run", help="run directory")
    p = sub.add_parser("status", help="which stages finished, which are running (where, which epoch), which not "
                                      "started; read-only, safe while the run goes on")
    p.add_argument("run", help="run directory")
    return ap


def check_args(args) -> None:
    """Refuse, in one line, an argument out of its range (--module -1, --temperature nan, --out '')."""
    for name, tp in ARGS.items():
        value = getattr(args, name, None)
        if value is not None:
            coerce(value, tp, f"--{name}" if name != "run" else "the run directory argument")


def dispatch(args) -> None:
    check_args(args)
    if args.cmd == "report":
        from .report import report
        report(args.run)
        return
    if args.cmd == "sample":
        from .lm_tools import sample
        print(args.prompt + sample(args.run, args.stage, args.prompt, args.tokens, args.temperature, args.seed))
        return
    if args.cmd == "status":
        from .status import status
        status(args.run)
        return
    if args.cmd == "export":
        from .interop import export
        export(args.run, args.stage, args.to)
        return
    if args.cmd == "plan":
        from .plan.estimate import Options, parse_memory, run_cli
        run_cli(lambda: load_recipe(args.recipe, args.set), Options(
            parse_memory(args.device_memory), args.devices_per_node, args.device_tflops, args.mfu, args.classes,
            args.train_samples), args.json)
        return
    recipe = load_recipe(args.recipe, args.set)
    if args.cmd == "run":
        from .pipeline import Launch, run
        if args.launcher is None and (args.jobs != 1 or args.retries is not None or args.address):
            raise UserError("--jobs, --retries and --address need --launcher local, ray or slurm")
        launch = None if args.launcher is None else Launch(args.launcher, args.jobs, args.retries, args.address)
        run(recipe, args.out, with_e2e=not args.no_e2e, with_grow=args.grow, launch=launch)
    elif args.cmd == "import-official":
        from .interop import import_official
        import_official(recipe, args.checkpoint, args.out, args.as_)
    else:
        stage = by_command(args.cmd)
        stage.main()(recipe, *(getattr(args, name) for name in stage.args))


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (`incubate status RUN | head -1`)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))   # Linux: no reader left
    except (OSError, ValueError):
        return False


def _quiet_after_closed_stdout() -> int:
    """Stop as a Unix tool killed by SIGPIPE would: no message, status 128 + 13."""
    # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail too
    # (the idiom of Python's signal docs, "Note on SIGPIPE")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def _interrupt_once(signum, frame):
    """Ctrl-C: one KeyboardInterrupt, and the presses after it ignored while the command winds down (a
    second KeyboardInterrupt raised inside the clean-up or the error line would end in a traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _catch_ctrl_c():
    """Install _interrupt_once where Python's own handler is (not where SIGINT is ignored: nohup ... &);
    returns the handler to put back when the command ends without an interrupt."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupt_once)
    return previous


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    console.attach()
    ok = False
    previous = _catch_ctrl_c()
    try:
        dispatch(args)
        sys.stdout.flush()      # a reader that left early fails here, inside the try, not at exit
        ok = True
    except UserError as e:
        if args.debug:
            raise getattr(e, "cause", None) or e     # the failing rank's own traceback
        if not getattr(e, "quiet", False):          # under torchrun, a failure every rank agreed on: rank 0 says it
            console.error(f"incubate: error: {e}")
        return 2
    except OSError as e:     # disk full or permissions outside checkpoint.py's atomic writes
        if isinstance(e, BrokenPipeError) and _stdout_reader_gone():
            return _quiet_after_closed_stdout()     # `incubate status RUN | head -1`: the reader had enough
        if args.debug:
            raise
        console.error(f"incubate: error: {e.filename or 'a file'}: {e.strerror or e}; checkpoints already on "
                      f"disk are intact: fix this, then rerun the same command (--debug shows where)")
        return 2
    except KeyboardInterrupt:
        previous = None         # the rest of the process ignores Ctrl-C: it is on its way out
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if args.debug:
            raise
        print("incubate: interrupted; the last complete checkpoint is kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        if previous is not None and signal.getsignal(signal.SIGINT) is _interrupt_once:
            signal.signal(signal.SIGINT, previous)
        if "torch.distributed" in sys.modules:      # under torchrun: leave the process group before exiting
            from .train.dist import close_dist
            close_dist(ok)
    return 0


def console_main(argv=None) -> int:
    """The `incubate` program (and `python -m incubate.cli`, every job's command): main, then an exit
    that does not walk torch's objects again."""
    status = main(argv)
    gc.collect()    # the garbage main left, collected now: its finalizers run as at any exit
    gc.freeze()     # the rest lives to the exit, whose collections over torch's 400k objects cost 2 s of CPU
    return status


@contextlib.contextmanager
def as_in_a_cli_process():
    """`main` called in another program's process computes as the `incubate` command does: one torch
    thread (whatever OMP_NUM_THREADS, so that its weights equal a launcher's jobs'); and what a stage
    turns on for the whole process (deterministic: true) is put back afterwards."""
    import torch
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(console_main())
