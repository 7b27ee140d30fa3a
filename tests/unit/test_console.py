"""A job tells `incubate run` what a person should see through its console file, not its log's format."""
import io
import json
import os
import subprocess
import sys

from incubate import console
from incubate.launchers import Job, Resources, run_jobs
from ..conftest import ROOT


class _WritesItsFiles:
    """A launcher whose one job writes a log line, a console line and a finished stage, then exits 0."""
    name = "test"

    def plan(self, stage, n_jobs, parallel):
        return 1, Resources()

    def submit(self, job, res):
        job.dir.path.mkdir(parents=True, exist_ok=True)
        with open(job.log, "a") as f:
            f.write("[module 0] epoch 1/1 only in the log\n")
        job.console.write_text("[module 0] said to a person\n")
        job.dir.weights.write_bytes(b"")
        job.dir.manifest_path.write_text(json.dumps({"finished": True}))
        return None

    def poll(self, handle):
        return 0, ""

    def stop(self, handle):
        pass


def test_the_scheduler_shows_the_console_file_and_not_the_log(tmp_path):
    out = io.StringIO()
    result = run_jobs(_WritesItsFiles(), [Job("incubate", tmp_path, 0)], 1, 0, out=out)
    assert result["finished"] == ["module 0"]
    assert "  [module 0] said to a person\n" in out.getvalue() and "only in the log" not in out.getvalue()


def _python(code_or_args, console_file):
    env = dict(os.environ, OMP_NUM_THREADS="1", **{console.ENV: str(console_file)})
    return subprocess.run([sys.executable, *code_or_args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_a_job_copies_its_standard_output_to_the_console_file(tmp_path):
    proc = _python(["-c", "from incubate import console; console.attach(); print('hello'); print('[meta] x')"],
                   tmp_path / "console.txt")
    assert proc.stdout == "hello\n[meta] x\n" == (tmp_path / "console.txt").read_text()


def test_a_job_copies_its_error_line_to_the_console_file(tmp_path):
    proc = _python(["-m", "incubate.cli", "meta", "--recipe", str(tmp_path / "missing.yaml"), "--out",
                    str(tmp_path / "run")], tmp_path / "console.txt")
    lines = (tmp_path / "console.txt").read_text().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("incubate: error: ")
    assert proc.stderr.strip() == lines[0]
