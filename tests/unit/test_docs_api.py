"""docs/api.md's examples run as written: every ```python block, in order, in one namespace, in an
empty folder (as a reader pastes them into one session)."""
import re

from incubate import families

from ..conftest import ROOT


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_the_examples_of_docs_api_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))    # the page registers a family
    blocks = python_blocks((ROOT / "docs/api.md").read_text())
    assert len(blocks) >= 5
    namespace = {"__name__": "docs_api"}
    for i, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/api.md, python block {i}", "exec"), namespace)
    assert "fine-tuned loss" in capsys.readouterr().out
    assert (tmp_path / "run/finetune/model.safetensors").exists() and "mlp" in families.FAMILIES
