"""The run directory's record: every check first, then `config.yaml` (earlier versions kept).

`prepare_run_dir` is what each command runs before it starts work. In this order, and writing nothing
until all have passed:
  1. the command's "already holds a run" check (without --resume): `run` refuses a run.dir with `data/`
     (or a run.storage holding a run), `train` one with checkpoints, `tune` one with a sweep; the one-stage
     commands (`generate|judge|eval`) refuse a run.dir that holds any of those, whose record they would
     otherwise replace;
  2. model paths: a local-looking path that does not exist, or (offline) a hub id that is not cached (at
     model.revision); a reward model (judge.reward_model, eval.reward_model) that is not a one-output
     sequence classifier; then each of run.loggers has its package installed;
  3. on --resume, the settings against the run's `config.yaml`: a change is refused, listing each key
     (old -> new), unless `accept_changes` (`--accept-changes`).
Then `run.dir` is created and `config.yaml` written atomically; a `config.yaml` with other settings is
first kept as `config.1.yaml`, `config.2.yaml`, ... (oldest first), so a run's history is never lost.

`run.dir` itself may differ on resume (filled in, made absolute): it names the directory, not a setting; so
may where the run is logged (run.loggers, run.project, run.tracking_uri).
The commands keep their own checks too (for callers of the Python API); this module does not run
anything, start Ray, or look inside run.storage beyond the existence of its `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from rayalign.config import Config, ConfigError
from rayalign.config_loader import config_to_dict, dump_config, load_config
from rayalign.io import atomic_write_text, new_run_dir
from rayalign.tracking import check_loggers

CONFIG_FILE = "config.yaml"
# may differ on --resume without changing the run (where it writes, what it is logged to)
NOT_SETTINGS = ("run.dir", "run.loggers", "run.project", "run.tracking_uri")
STAGE_COMMANDS = ("generate", "judge", "eval")
SWEEP_FILE = "sweep.yaml"  # a sweep's resolved config (in RUN_DIR/tune/); its --resume must match it


def resolve_run_dir(config: Config, root: str | Path = "runs") -> Config:
    """`config` with `run.dir` absolute (a fresh timestamped one under `root` when unset); writes nothing."""
    # Absolute: Ray Train workers run in their own working directory, where a relative path means nothing.
    run_dir = (Path(config.run.dir) if config.run.dir else new_run_dir(root)).expanduser().absolute()
    return dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(run_dir)))


def _holds(run_dir: Path) -> str | None:
    """What in `run_dir` makes it another command's run (the loop's, a training's, a sweep's), if anything."""
    from rayalign.checkpoint import latest_checkpoint

    if (run_dir / "data").is_dir():
        return "a run (data/)"
    if latest_checkpoint(run_dir) or (run_dir / "final").exists():
        return "a training run (checkpoints/, final/)"
    if (run_dir / "tune").is_dir():
        return "a sweep (tune/)"
    return None


def check_existing_sweep(config: Config, tune_dir: Path, resume: bool) -> None:
    """A run dir holds one sweep: a second start needs --resume, and --resume needs the same config."""
    sweep_file = tune_dir / SWEEP_FILE
    if not sweep_file.exists():
        return
    if not resume:
        raise ConfigError(f"run.dir: {tune_dir.parent} already holds a sweep; pass --resume to continue it "
                          "or choose a new run.dir")
    before, after = _settings(load_config(sweep_file)), _settings(config)
    changed = [key for key in after if before.get(key) != after[key]]  # `config_changes`' keys
    if changed:
        raise ConfigError(f"{changed[0]}: differs from the sweep being resumed ({sweep_file}); Ray Tune cannot "
                          f"change a sweep on --resume (changed: {', '.join(changed)})")


def check_existing(command: str | None, config: Config, *, resume: bool) -> None:
    """The command's own "already holds a run" refusal, before anything is written (`config` resolved)."""
    run_dir = Path(config.run.dir)
    again = "pass --resume to continue it or choose a new run.dir"
    if command == "run" and not resume:
        if (run_dir / "data").exists():
            raise ConfigError(f"run.dir: {run_dir} already holds a run; {again}")
        from rayalign.storage import RunStorage

        store = RunStorage.from_config(config)
        if store and store.exists(store.local_root / CONFIG_FILE):
            raise ConfigError(f"run.storage: {config.run.storage} already holds a run; pass --resume to continue it")
    elif command == "train" and not resume:
        from rayalign.checkpoint import latest_checkpoint
        from rayalign.storage import RunStorage
        from rayalign.storage_train import latest_stored_checkpoint

        store = RunStorage.from_config(config)
        latest = latest_stored_checkpoint(store, run_dir) if store else latest_checkpoint(run_dir)
        if latest:
            where = f"run.storage: {store.location(run_dir)}" if store else f"run.dir: {run_dir}"
            raise ConfigError(f"{where} already has checkpoints (newest {latest.name}); {again}")
    elif command == "tune":
        check_existing_sweep(config, run_dir / "tune", resume)  # also: a resumed sweep cannot change
    elif command in STAGE_COMMANDS and (what := _holds(run_dir)):
        raise ConfigError(f"run.dir: {run_dir} holds {what}; `rayalign {command}` writes its outputs and "
                          "config.yaml into a run.dir of its own: choose another")


def check_models(config: Config) -> None:
    """Each set model.* path exists, or is a hub id (cached, when HF_HUB_OFFLINE=1): a ConfigError naming the key."""
    from rayalign.models import ModelNotFoundError, check_model_name

    for key in ("policy", "reference", "tokenizer"):
        value = getattr(config.model, key)
        try:
            if value:
                check_model_name(value, f"model.{key}", model=key != "tokenizer", revision=config.model.revision)
        except ModelNotFoundError as exc:
            raise ConfigError(str(exc)) from None
    reward_models = {"judge.reward_model": config.judge.reward_model, "eval.reward_model": config.eval.reward_model}
    for key, value in reward_models.items():
        if value:  # and it is a sequence classifier with one output, not e.g. a causal LM
            from rayalign.reward_model import check_reward_model, reward_load_options

            check_reward_model(value, key, load=reward_load_options(config.model))


def _settings(config: Config) -> dict[str, object]:
    flat = {f"{section}.{key}": value for section, body in config_to_dict(config).items()
            for key, value in body.items()}
    return {key: value for key, value in flat.items() if key not in NOT_SETTINGS}


def config_changes(old: Config, new: Config) -> list[str]:
    """`key: old -> new` for every setting that differs (run.dir excluded)."""
    before, after = _settings(old), _settings(new)
    return [f"{key}: {before[key]!r} -> {after[key]!r}" for key in after if before.get(key) != after[key]]


def _recorded_text(config: Config) -> tuple[str | None, str]:
    """(the run's recorded config.yaml text or None, where it is): run.dir's, else on --resume from an empty
    run.dir the stored run's (`run.storage`), read without writing anything into run.dir."""
    path = Path(config.run.dir) / CONFIG_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    if not config.run.storage:
        return None, str(path)
    from rayalign.storage import RunStorage

    store = RunStorage(config.run.storage, config.run.dir)
    try:
        with store.fs.open_input_stream(store.fs_path(path)) as stream:
            return stream.read().decode("utf-8", errors="replace"), store.location(path)
    except (FileNotFoundError, OSError):
        return None, store.location(path)


def _parsed(text: str) -> Config | None:
    """The config a run recorded; None when it cannot be read (then it differs from anything)."""
    import yaml

    from rayalign.config_loader import build_config

    try:
        tree = yaml.safe_load(text)
        return build_config(tree) if isinstance(tree, dict) else None
    except (ConfigError, yaml.YAMLError):
        return None


def check_changes(config: Config, *, resume: bool, accept_changes: bool) -> tuple[list[str], str | None]:
    """(the changes against the recorded config.yaml, its text); on --resume, refused unless accepted."""
    text, where = _recorded_text(config)
    if text is None:
        return [], None
    old = _parsed(text)
    changes = config_changes(old, config) if old else [f"{where}: unreadable as a config"]
    if changes and resume and not accept_changes:
        kept = _next_version(Path(config.run.dir) / CONFIG_FILE).name
        raise ConfigError(f"run.dir: --resume would change the run's settings ({'; '.join(changes)}); drop those "
                          f"overrides, or pass --accept-changes to continue with them ({where} is then kept as "
                          f"{kept})")
    return changes, text


def _next_version(path: Path) -> Path:
    n = 1
    while (path.parent / f"{path.stem}.{n}{path.suffix}").exists():
        n += 1
    return path.parent / f"{path.stem}.{n}{path.suffix}"


def write_config(config: Config, earlier: str | None) -> Path:
    """Create run.dir and write config.yaml atomically; `earlier`, the recorded settings it replaces (None:
    no change), is kept as config.N.yaml first."""
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path, text = run_dir / CONFIG_FILE, dump_config(config)
    if path.is_file() and path.read_text(encoding="utf-8", errors="replace") == text:
        return path
    if earlier is not None and path.is_file():
        try:  # a hard link, then the atomic replace: never a moment without either version
            os.link(path, _next_version(path))
        except OSError:  # a filesystem without hard links
            shutil.copy2(path, _next_version(path))
    elif earlier is not None:  # the stored run's record (--resume from an empty run.dir)
        atomic_write_text(_next_version(path), earlier)
    return atomic_write_text(path, text)


def prepare_run_dir(config: Config, root: str | Path = "runs", *, command: str | None = None,
                    resume: bool = False, accept_changes: bool = False) -> Config:
    """Run every check, then create `run.dir` and write `config.yaml`; returns the config with run.dir filled in.

    `command` (`run`, `train`, `tune`, `generate`, `judge`, `eval`) selects its "already holds a run" check
    and turns on the model checks; None (the Python API) runs only the change check.
    """
    config = resolve_run_dir(config, root)
    if command:
        check_existing(command, config, resume=resume)
        check_models(config)
        check_loggers(config.run.loggers)
    changes, earlier = check_changes(config, resume=resume, accept_changes=accept_changes)
    write_config(config, earlier if changes else None)
    if changes and resume:
        print(f"rayalign: --accept-changes: continuing with {'; '.join(changes)}", flush=True)
    return config
