"""The `incubate` program's exit: the garbage of its run collected, the rest frozen, so that the
interpreter's last collections do not walk torch's objects again (2 s of CPU a process)."""
import gc
import runpy
import sys
import tomllib

import pytest

from incubate import cli
from ..conftest import ROOT


@pytest.fixture
def gc_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("collect"))
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    return calls


def test_the_command_collects_then_freezes_after_main_and_keeps_its_status(monkeypatch, gc_calls):
    monkeypatch.setattr(cli, "main", lambda argv=None: gc_calls.append(("main", argv)) or 2)
    assert cli.console_main(["status", "x"]) == 2
    assert gc_calls == [("main", ["status", "x"]), "collect", "freeze"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"incubate": "incubate.cli:console_main"}


@pytest.mark.filterwarnings("ignore:'incubate.cli' found in sys.modules")     # runpy: this test imported it first
def test_python_m_incubate_cli_exits_through_it(monkeypatch, gc_calls, tmp_path, capsys):
    """Every job's command (`python -m incubate.cli STAGE ...`), here on a folder that is not a run."""
    monkeypatch.setattr(sys, "argv", ["incubate", "status", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("incubate.cli", run_name="__main__")
    assert stop.value.code == 2 and "is not a run directory" in capsys.readouterr().err
    assert gc_calls == ["collect", "freeze"]
