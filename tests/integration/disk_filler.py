"""The CLI, with the file system under the run directory (or the token cache) filled up during a write.

    python -m tests.integration.disk_filler [checkpoint|token_cache] FILLER incubate-args...

checkpoint (the default): when the second training checkpoint of a stage starts being written (the
first is on disk), FILLER (a file on the same file system) grows until the file system is full,
then gives back 8 KiB: the checkpoint's write begins and meets the kernel's own ENOSPC part way.
token_cache: the same when the first token file of a cache entry (train.bin) starts being written.
Nothing about the write itself is faked. Meant to run on a small tmpfs (see test_bad_input.py), so
that filling it is quick.
"""
import errno
import os
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


def patch_checkpoint(filler: Path) -> None:
    from incubate import checkpoint
    real = checkpoint.save_file

    def filling(tensors, filename, metadata=None):
        target = Path(filename).name.split(".")[0]
        if target == "checkpoint" and (Path(filename).parent / "checkpoint.safetensors").exists():
            fill(filler)
        return real(tensors, filename, metadata=metadata)

    checkpoint.save_file = filling


def patch_token_cache(filler: Path) -> None:
    from incubate import token_cache
    real = token_cache._write_split

    def filling(path, parts, dtype):
        if Path(path).name == "train.bin":
            fill(filler)
        return real(path, parts, dtype)

    token_cache._write_split = filling


if __name__ == "__main__":
    at = sys.argv.pop(1) if sys.argv[1] in ("checkpoint", "token_cache") else "checkpoint"
    {"checkpoint": patch_checkpoint, "token_cache": patch_token_cache}[at](Path(sys.argv[1]))
    from incubate.cli import main
    sys.exit(main(sys.argv[2:]))
