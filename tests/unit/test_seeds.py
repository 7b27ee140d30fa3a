"""The seed table: each stage and module trains from its own stream, and the stages that train one
whole model take theirs from it."""
import ast
from pathlib import Path

from incubate.train.seeds import stage_seed

STAGES = Path(__file__).resolve().parents[2] / "incubate" / "stages"


def test_every_stage_keeps_its_seed_but_finetune_which_no_module_reaches():
    assert [stage_seed(7, s) for s in ("meta", "e2e", "grow")] == [7, 7, 1007]
    assert [stage_seed(7, "incubate", i) for i in range(4)] == [8, 9, 10, 11]
    assert stage_seed(7, "incubate", 3, shared_data_order=True) == 8
    finetune = stage_seed(7, "finetune")
    for k in (1, 4, 12, 96, 4096):       # any division length: modules take 1..K
        modules = {stage_seed(7, "incubate", i) for i in range(k)}
        assert finetune not in modules and stage_seed(7, "meta") not in modules
    assert finetune != stage_seed(7, "meta") and finetune != stage_seed(7, "grow")


def test_no_stage_writes_its_own_seed_offset():
    """The seeds come from incubate/train/seeds.py only: no stage adds a number to recipe.seed itself."""
    for path in sorted(STAGES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
                assert "seed" not in ast.unparse(node.left), f"{path.name}: {ast.unparse(node)}"
