"""The CLI, with the file system under the run directory (or the token cache) filled up during a write,
then the same command again with the space given back, both in this one process.

    python -m tests.integration.disk_filler checkpoint|token_cache FILLER OUT AFTER_FILL AFTER_RERUN incubate-args...

checkpoint: when the second training checkpoint of a stage starts being written (the first is on
disk), FILLER (a file on the same file system) grows until the file system is full, then gives back
8 KiB: the checkpoint's write begins and meets the kernel's own ENOSPC part way.
token_cache: the same when the first token file of a cache entry (train.bin) starts being written.
Nothing about the write itself is faked. Then the shell command AFTER_FILL runs (to copy or list
what the test needs out of the file system), FILLER is removed, the filling is undone and the command
runs again; then AFTER_RERUN. Each run's exit code and output go to OUT/1.rc, 1.out, 1.err and 2.*.
Meant to run on a small tmpfs (see test_bad_input.py), so that filling it is quick.
"""
import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

ROOM = 8192         # what the write gets before the disk is full


def fill(filler: Path) -> None:
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    chunk = b"\0" * (1 << 16)
    try:
        while True:
            os.write(fd, chunk)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    os.ftruncate(fd, max(0, os.fstat(fd).st_size - ROOM))
    os.close(fd)


def patch_checkpoint(filler: Path):
    """Returns what undoes the patch."""
    from incubate.store import checkpoint
    real = checkpoint.save_file

    def filling(tensors, filename, metadata=None):
        target = Path(filename).name.split(".")[0]
        if target == "checkpoint" and (Path(filename).parent / "checkpoint.safetensors").exists():
            fill(filler)
        return real(tensors, filename, metadata=metadata)

    checkpoint.save_file = filling
    return lambda: setattr(checkpoint, "save_file", real)


def patch_token_cache(filler: Path):
    """Returns what undoes the patch."""
    from incubate.data import token_cache
    real = token_cache._write_split

    def filling(path, parts, dtype):
        if Path(path).name == "train.bin":
            fill(filler)
        return real(path, parts, dtype)

    token_cache._write_split = filling
    return lambda: setattr(token_cache, "_write_split", real)


def run_cli(args: list[str], out: Path, n: int) -> None:
    from incubate.cli import main
    with open(out / f"{n}.out", "w") as o, open(out / f"{n}.err", "w") as e, \
            contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = main(args)
    (out / f"{n}.rc").write_text(f"{rc}\n")


if __name__ == "__main__":
    at, filler, out, after_fill, after_rerun, args = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), \
        sys.argv[4], sys.argv[5], sys.argv[6:]
    undo = {"checkpoint": patch_checkpoint, "token_cache": patch_token_cache}[at](filler)
    run_cli(args, out, 1)
    subprocess.run(after_fill, shell=True, check=True)
    filler.unlink()
    undo()          # the space is back: the rerun writes as any would
    run_cli(args, out, 2)
    subprocess.run(after_rerun, shell=True, check=True)
