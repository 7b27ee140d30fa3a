"""The CLI, with the file system under the run directory filled up during a training checkpoint write.

    python -m tests.integration.disk_filler FILLER incubate-args...

When the second training checkpoint of a stage starts being written (the first is on disk), FILLER
(a file on the same file system) grows until the file system is full, then gives back 8 KiB: the
checkpoint's write begins and meets the kernel's own ENOSPC part way. Nothing about the write itself
is faked. Meant to run on a small tmpfs (see test_bad_input.py), so that filling it is quick.
"""
import errno
import os
import sys
from pathlib import Path

ROOM = 8192         # what the checkpoint's write gets before the disk is full


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


def patch(filler: Path) -> None:
    from incubate import checkpoint
    real = checkpoint.save_file

    def filling(tensors, filename, metadata=None):
        target = Path(filename).name.split(".")[0]
        if target == "checkpoint" and (Path(filename).parent / "checkpoint.safetensors").exists():
            fill(filler)
        return real(tensors, filename, metadata=metadata)

    checkpoint.save_file = filling


if __name__ == "__main__":
    patch(Path(sys.argv[1]))
    from incubate.cli import main
    sys.exit(main(sys.argv[2:]))
