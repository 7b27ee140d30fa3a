"""Bad input through the CLI: one line, exit 2, no traceback, nothing written."""
from ..conftest import cli


def test_unknown_set_key_lists_valid_keys(tiny_recipe, tmp_path):
    proc = cli("meta", "--recipe", tiny_recipe, "--out", tmp_path / "r", "--set", "train.learning_rate=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "unknown recipe key 'train.learning_rate'" in line and "lr," in line
    assert not (tmp_path / "r").exists()


def test_bad_module_index(tiny_recipe, tmp_path):
    proc = cli("incubate", "--recipe", tiny_recipe, "--out", tmp_path / "r", "--module", "7")
    assert proc.returncode == 2 and "--module 7 is out of range" in proc.stderr and "(0..3)" in proc.stderr


def test_incubate_without_meta_model(tiny_recipe, tmp_path):
    proc = cli("incubate", "--recipe", tiny_recipe, "--out", tmp_path / "r", "--module", "0")
    assert proc.returncode == 2 and "meta has not finished" in proc.stderr and "incubate meta" in proc.stderr


def test_missing_data_path(tiny_recipe, tmp_path):
    proc = cli("meta", "--recipe", tiny_recipe, "--out", tmp_path / "r", "--set", "data.source=idx:/no/such")
    assert proc.returncode == 2 and "data path /no/such" in proc.stderr


def test_debug_shows_traceback(tiny_recipe, tmp_path):
    proc = cli("--debug", "meta", "--recipe", tiny_recipe, "--out", tmp_path / "r", "--set", "train.x=1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_run_directory_refuses_another_model_but_allows_new_training_settings(tiny_recipe, tmp_path):
    import yaml
    run = tmp_path / "r"
    cli("meta", "--recipe", tiny_recipe, "--out", run, "--set", "meta.epochs=1", check=True)
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    del saved["data"]["num_workers"]          # written by an older version without this key
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    ok = cli("meta", "--recipe", tiny_recipe, "--out", run, "--set", "finetune.epochs=3",
             "--set", "data.eval_batch_size=100")
    assert ok.returncode == 0, ok.stderr
    proc = cli("meta", "--recipe", tiny_recipe, "--out", run, "--set", "model.kwargs.embed_dim=32")
    assert proc.returncode == 2 and "was made with model.kwargs=" in proc.stderr and "use a new --out" in proc.stderr
