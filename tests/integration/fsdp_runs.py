"""Under torchrun: several CLI commands in one pair of ranks, so that the tests pay torch's imports and
the process group's start once (tests/integration/test_fsdp.py).

    torchrun ... -m tests.integration.fsdp_runs '[["run", "--recipe", R, "--out", O], ...]'
"""
import json
import sys

from incubate.cli import dispatch, parser
from incubate.train.dist import close_dist

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        dispatch(parser().parse_args(argv))
    close_dist(True)
