"""Bad input through the CLI: one line, exit 2, no traceback, nothing written.

In this process (run_main) where the refusal comes after torch is imported: a fresh process would
spend its time importing torch, not on the refusal; the first two start one (their refusals come first)."""
from ..conftest import cli, run_main


def test_unknown_set_key_lists_valid_keys(tiny_recipe, tmp_path):
    proc = cli("meta", "--recipe", tiny_recipe, "--out", tmp_path / "r", "--set", "train.learning_rate=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "unknown recipe key 'train.learning_rate'" in line and "lr," in line
    assert not (tmp_path / "r").exists()


def test_debug_shows_traceback(tiny_recipe, tmp_path):
    proc = cli("--debug", "meta", "--recipe", tiny_recipe, "--out", tmp_path / "r", "--set", "train.x=1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_bad_module_index(tiny_recipe, tmp_path, capsys):
    rc, _, err = run_main(capsys, "incubate", "--recipe", tiny_recipe, "--out", tmp_path / "r", "--module", "7")
    assert rc == 2 and "--module 7 is out of range" in err and "(0..3)" in err


def test_incubate_without_meta_model(tiny_recipe, tmp_path, capsys):
    rc, _, err = run_main(capsys, "incubate", "--recipe", tiny_recipe, "--out", tmp_path / "r", "--module", "0")
    assert rc == 2 and "meta has not finished" in err and "incubate meta" in err


def test_missing_data_path(tiny_recipe, tmp_path, capsys):
    rc, _, err = run_main(capsys, "meta", "--recipe", tiny_recipe, "--out", tmp_path / "r", "--set",
                          "data.source=idx:/no/such")
    assert rc == 2 and "data path /no/such" in err


def test_run_directory_refuses_another_model_but_allows_new_training_settings(tiny_recipe, tmp_path, capsys):
    import yaml
    run = tmp_path / "r"
    assert run_main(capsys, "meta", "--recipe", tiny_recipe, "--out", run, "--set", "meta.epochs=1")[0] == 0
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    del saved["data"]["num_workers"]          # written by an older version without this key
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    rc, _, err = run_main(capsys, "meta", "--recipe", tiny_recipe, "--out", run, "--set", "finetune.epochs=3",
                          "--set", "data.eval_batch_size=100")
    assert rc == 0, err
    rc, _, err = run_main(capsys, "meta", "--recipe", tiny_recipe, "--out", run, "--set", "model.kwargs.embed_dim=32")
    assert rc == 2 and "was made with model.kwargs=" in err and "use a new --out" in err
