"""The run directory: where each stage's folder is, its manifest and lock, the run's recipe.yaml
and summary.json. Only folders and files; what trains a stage is in incubate/stages."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .checkpoint import (CHECKPOINT, load_weights, previous_checkpoint, save_weights, training_checkpoint,
                         uninterrupted, write_json_atomic, write_text_atomic)
from ..recipe.schema import Recipe, dump_recipe
from ..errors import UserError
from .lock import hold, release
from .safe_read import kind, read_json, read_yaml
from ..stage_registry import META, in_folders
from ..stage_registry import stage as registered

# Parts of the recipe that must not change inside one run directory: what the weights and the
# dataset are. Training settings, loader settings and augmentation may change between stages.
FIXED_KEYS = ("model.family", "model.name", "model.kwargs", "model.division", "model.meta_division",
              "data.source", "data.img_size", "data.train_fraction", "data.subset_seed", "data.context",
              "data.val_fraction", "data.tokenizer", "data.vocab_size", "data.eval_tokens", "data.text_column")


class StageDir:
    def __init__(self, run: Path, stage: str, module: int | None = None):
        self.run, self.stage, self.module = Path(run), stage, module
        self.path = self.run / registered(stage).folder.format(module=module)
        self.weights = self.path / "model.safetensors"
        self.manifest_path = self.path / "manifest.json"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoint = self.path / CHECKPOINT

    def training_checkpoint(self) -> Path | None:
        """The stage's mid-training checkpoint (either format, or the one before it), or None."""
        return training_checkpoint(self.path)

    @classmethod
    def at(cls, folder: Path) -> "StageDir":
        """The stage whose folder is `folder`, as its manifest.json names it (the run is the folder's
        parent, or its grandparent for a module's RUN/modules/<i>)."""
        m = read_json(Path(folder) / "manifest.json")
        if m.get("stage") not in in_folders():
            raise UserError(f"{Path(folder) / 'manifest.json'} names no stage of a run directory ({m.get('stage')!r}); "
                            f"pass a stage folder of a run directory")
        depth = len(Path(registered(m["stage"]).folder).parts)
        return cls(Path(folder).parents[depth - 1], m["stage"], m.get("module"))

    @property
    def hint(self) -> str:
        """How a person makes this stage: `run `incubate <command>` first`."""
        return registered(self.stage).hint(self.module)

    @property
    def label(self) -> str:
        return f"module {self.module}" if registered(self.stage).per_module else self.stage

    def manifest(self) -> dict | None:
        """The stage's manifest.json (None before the stage began); a damaged one is one line."""
        if not self.manifest_path.exists():
            return None
        return read_json(self.manifest_path, dict, "manifest", f"delete {self.path} and rerun that stage")

    def finished(self) -> bool:
        m = self.manifest()
        return bool(m and m.get("finished") and self.weights.exists())

    def require_finished(self, hint: str | None = None) -> dict:
        """The finished stage's manifest, else one line that says how to make it (`hint`, by default
        the stage's command)."""
        m = self.manifest()
        if not (m and m.get("finished")):
            hint = hint or self.hint
            raise UserError(f"{self.label} has not finished: {self.manifest_path} is missing or unfinished; {hint}")
        return m

    def load(self) -> dict:
        m = self.require_finished("run that stage first")
        return load_weights(self.weights, m.get("sha256"))


def stage_dirs(run: Path, k: int) -> list[StageDir]:
    """Every stage folder of a run whose target has `k` modules, in the order the stages run."""
    return [StageDir(run, s, i) for s in in_folders() for i in (range(k) if registered(s).per_module else [None])]


def meta_fingerprint(run: Path) -> str:
    """The run's finished meta model's fingerprint (the SHA-256 of its weights file), which every
    stage made from it records."""
    how = f"{registered(META).hint()}, or `incubate import-official CKPT --as {META}`"
    return StageDir(run, META).require_finished(how)["sha256"]


def check_tokenizer(m: dict, have: str, path: Path, what) -> None:
    """Refuse the tokenizer at `path` (SHA-256 `have`) unless it is the one manifest `m`'s stage
    (`what`) was trained with."""
    from ..data.bpe import RESTORE         # here: reading a run's folders needs no tokenizer code
    want = (m.get("preprocess") or {}).get("tokenizer_sha256")
    if want and want != have:
        raise UserError(f"{path} (SHA-256 {have[:12]}) is not the tokenizer {what} was trained with ({want[:12]}, "
                        f"its manifest); {RESTORE}")


RUN_RECIPE_FIX = ("restore it from a copy (every stage's manifest.json names the model and data it was made "
                  "with), or use a new --out")


def run_recipe(run: Path) -> dict:
    """The mapping in RUN/recipe.yaml, read within safe_read's limits; damage is one line."""
    raw = read_yaml(Path(run) / "recipe.yaml", "the run's recipe", RUN_RECIPE_FIX)
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise UserError(f"the run's recipe {Path(run) / 'recipe.yaml'} holds {kind(raw)} with no model section; "
                        f"{RUN_RECIPE_FIX}")
    return raw


def run_modules(run: Path) -> int:
    """K of the run: its recipe's division, or, the recipe being damaged, its modules/<i> folders."""
    try:
        division = run_recipe(run)["model"].get("division")
        if isinstance(division, list) and division:
            return len(division)
    except UserError:
        pass
    found = [int(p.name) for p in (Path(run) / "modules").glob("*") if p.name.isdigit() and p.name.isascii()]
    return max(found) + 1 if found else 0


def is_run_directory(path: Path) -> bool:
    """A folder holding a recipe.yaml beside a stage folder: what --out made."""
    path = Path(path)
    tops = {registered(s).folder.split("/")[0] for s in in_folders()}      # modules/{module} -> modules
    return (path / "recipe.yaml").is_file() and any((path / d).is_dir() for d in tops)


def check_destination(path, flag: str, own_run: Path | None = None) -> Path:
    """A folder a command writes (`flag`: --out, --to): named, and not inside a run directory's own
    folders (--to: not the run directory either), where it would mix with a run's stages."""
    if not str(path).strip():
        raise UserError(f"{flag} is empty; pass the folder to write")
    if "\0" in str(path):
        raise UserError(f"{flag} holds a NUL character; pass a folder name")
    p = Path(path).resolve()
    inside = [q for q in ([p] if flag != "--out" else []) + list(p.parents) if is_run_directory(q)]
    if own_run is not None and (p == Path(own_run).resolve() or Path(own_run).resolve() in p.parents):
        inside.insert(0, Path(own_run))
    if inside:
        raise UserError(f"{flag} {path} is inside run directory {inside[0]}, whose folders hold its stages; "
                        f"pass a folder outside it")
    return p


def check_run_recipe(run: Path, recipe: Recipe) -> None:
    """Refuse an --out inside another run, and a recipe whose FIXED_KEYS differ from the run
    directory's recipe.yaml."""
    check_destination(run, "--out")
    if not (run / "recipe.yaml").exists():
        return
    old = run_recipe(run)
    new = recipe.to_dict()
    defaults = Recipe().to_dict()      # a key an older version did not write has its default

    def get(d, dotted):
        for part in dotted.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    for key in FIXED_KEYS:
        if key == "data.vocab_size" and get(new, "data.tokenizer") == "byte":
            continue        # byte tokens: the vocabulary is 256 whatever data.vocab_size says
        before = get(old, key) if get(old, key) is not None else get(defaults, key)
        if before != get(new, key):
            raise UserError(f"run directory {run} was made with {key}={before!r} (its recipe.yaml), not "
                            f"{get(new, key)!r}; use a new --out, or the same recipe")


def write_run_recipe(run: Path, recipe: Recipe) -> None:
    """RUN/recipe.yaml, refusing a run directory made with another model or data; called only by a
    command about to train or write a stage (one that changes nothing leaves the file as it is)."""
    check_run_recipe(run, recipe)
    try:
        run.mkdir(parents=True, exist_ok=True)
        text, path = dump_recipe(recipe), run / "recipe.yaml"
        if not (path.exists() and path.read_bytes() == text.encode()):
            write_text_atomic(path, text)
    except OSError as e:
        raise UserError(f"cannot write the run directory {run}: {e.strerror}; choose a writable --out") from None


def claim(stage: StageDir) -> None:
    """Create the stage folder and hold its lock until the stage finishes (or the process ends)."""
    try:
        stage.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {stage.path}: {e.strerror}; choose a writable --out") from None
    hold(stage.path, f"{stage.label} of run directory {stage.run}")


def begin_stage(stage: StageDir, manifest: dict, main: bool) -> bool:
    """Returns False when the stage already finished (then it is skipped).

    A finished stage is skipped without its lock; otherwise the main process locks the stage folder,
    so a second process writing the same stage is refused (the lock is dropped when the stage finishes).
    """
    if main and not stage.finished():
        claim(stage)
    if stage.finished():
        if main:
            print(f"[{stage.label}] already finished in {stage.path}; skipping", flush=True)
        return False
    if main:
        for stale in stage.path.glob("*.tmp"):     # left by a write that was killed (the folder is locked)
            stale.unlink(missing_ok=True)
        write_json_atomic(stage.manifest_path, manifest)
    return True


def finish_stage(stage: StageDir, state: dict, manifest: dict) -> dict:
    """Write the stage's weights, then its finished manifest, then the run summary; drop the lock."""
    with uninterrupted():     # Ctrl-C waits until weights, manifest and summary agree
        manifest = dict(manifest, sha256=save_weights(state, stage.weights), finished=True,
                        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_json_atomic(stage.manifest_path, manifest)
        stage.checkpoint.unlink(missing_ok=True)
        previous_checkpoint(stage.checkpoint).unlink(missing_ok=True)
        from .sharded import remove     # torch on first use: a process that only reads manifests starts sooner
        remove(stage.path)      # train.parallel: fsdp's checkpoint folders
        write_summary(stage.run)
    release(stage.path)
    return manifest


def finished_manifests(run: Path) -> tuple[list, list[str]]:
    """(stage folder, manifest) of every finished stage whose manifest reads, and one line for each
    that does not (`status` and `report` show the rest and name these)."""
    found, damaged = [], []
    for sd in stage_dirs(run, run_modules(run)):
        try:
            m = sd.manifest()
            if m and m.get("finished") and not isinstance(m.get("metrics"), dict):
                raise UserError(f"{sd.manifest_path} has no metrics mapping; delete {sd.path} and rerun that stage")
        except UserError as e:
            damaged.append(str(e))
            continue
        if m and m.get("finished"):
            found.append((sd, m))
    return found, damaged


def write_summary(run: Path) -> dict:
    """RUN/summary.json: one entry a finished stage (the task's metrics, e.g. top1 and loss, or bpb,
    loss and acc; seconds, FLOPs, trainable params); a damaged manifest's stage is left out. The file
    is rewritten only when its content changes."""
    summary = {}
    for sd, m in finished_manifests(run)[0]:
        key = f"module_{sd.module}" if sd.module is not None else sd.stage
        summary[key] = {"stage": sd.stage, "module": sd.module, **m["metrics"],
                        "seconds": m.get("process_seconds", m.get("seconds", 0.0)),
                        "flops": m.get("flops", 0), "trainable_params": m.get("trainable_params", 0),
                        "epochs": m.get("epochs", 0)}
    path, text = run / "summary.json", json.dumps(summary, indent=2, sort_keys=False) + "\n"
    if not (path.is_file() and path.read_bytes() == text.encode()):
        write_text_atomic(path, text)
    return summary
