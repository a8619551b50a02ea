"""`rayalign train`: preference pairs in, an aligned HF checkpoint out, on Ray Train workers.

The driver validates the data (the same checks and messages as `rayalign data check`), splits off the
evaluation pairs, tokenizes and scores the reference with Ray Data (`rayalign.prepare`, cached), writes
the prepared Parquet into the run directory and runs `train_fn_per_worker` under a `TorchTrainer`.
Outputs: `metrics.jsonl`, `tb/`, `checkpoints/step-N/`, `final/` (see `rayalign.train_loop`).

It does not generate or judge samples; the iterative loop calls it once per iteration.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

from rayalign.config import Config, ConfigError
from rayalign.config_loader import config_to_dict
from rayalign.data_kind import GROUPS, LEVEL_PAIRS, PAIRS, decide
from rayalign.io import atomic_write_text
from rayalign.stage_inputs import StageInputs
from rayalign.storage import RunStorage
from rayalign.storage_train import pull_outputs, ray_storage, worker_paths
from rayalign.templating import check_data_template

POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # read when the trainer starts its controller
USER_POLL_S = os.environ.get(POLL_ENV)  # a value the user exported wins over `poll_interval`


def poll_interval(num_workers: int) -> float:
    """Seconds between the controller's polls of the workers: 0.25 up to 16 workers (measured on a 1-worker
    fit here: 11.1-11.7 s at 0.25, 12.6 s at 0.5, 14.2 s at Ray's 2.0), then longer so that the controller
    sends at most ~64 polls a second; never above Ray's default."""
    return min(2.0, max(0.25, num_workers / 64))


def _log(message: str) -> None:
    print(f"rayalign train: {message}", flush=True)


def ensure_ray() -> None:
    from rayalign.ray_session import init_ray  # RAY_ADDRESS, a live head, or a local Ray; never a dead head

    init_ray()


def build_policy_if_needed(policy: str, config: Config, run_dir: Path, texts: list[str]) -> str:
    """The stage's `policy` (model.policy) or, when empty, a tiny Llama whose tokenizer is trained on the data's
    own texts."""
    if policy:
        return policy
    from rayalign.io import atomic_directory
    from rayalign.tiny import make_tiny_model

    out = run_dir / "tiny-model"
    if not (out / "config.json").exists():
        corpus = atomic_write_text(run_dir / "data" / "corpus.jsonl",
                                   "".join(json.dumps({"text": t}) + "\n" for t in texts))
        with atomic_directory(out) as tmp:
            make_tiny_model(tmp, corpus=corpus, seed=config.train.seed)
        _log(f"built the tiny local model {out} (model.policy is empty)")
    return str(out)


def pair_rows(fmt: str, rows: list[dict], config: Config, source: str | None = None) -> tuple[str, list[dict]]:
    """The data kind of a run (`rayalign.data_kind.decide`, from the loss and the format of `source`, by
    default data.train_file) and the rows the trainer takes: GDPO rows stay whole for loss.type=gdpo, else
    become DPO pairs; K-sample losses (exo_rw, dpo_rw) take k_sample rows, all of one K."""
    from rayalign.batching import gdpo_rows_as_pairs
    from rayalign.group_batching import check_group_rows
    from rayalign.loss_registry import LOSSES

    source = source or config.data.train_file
    kind = decide(LOSSES[config.loss.type], fmt, source)
    if kind == GROUPS:
        check_group_rows(rows, source)
    return kind, gdpo_rows_as_pairs(rows) if kind == LEVEL_PAIRS else rows


def split_eval(rows: list[dict], config: Config, tokenizer, kind: str | None = None,
               inputs: StageInputs | None = None) -> tuple[list[dict], list[dict]]:
    """Held-out pairs: `data.eval_file` or the `data.eval_split` split of the training source (whose rows must
    be of the training data's `kind`), or a seeded `data.eval_fraction` of the training rows (all three: the
    stage's `inputs`, by default the config's)."""
    from rayalign.data import Selection, load_rows

    inputs = inputs or StageInputs.from_config(config)
    if inputs.eval_file or inputs.eval_split:
        if inputs.eval_file:  # its own source, read whole (split "train")
            key, source, select = "data.eval_file", inputs.eval_file, Selection()
        else:
            key, source, select = "data.eval_split", inputs.train_file, inputs.selection(evaluation=True)
        data = load_rows(source, fmt=inputs.format, tokenizer=tokenizer, select=select)
        check_data_template(tokenizer, data.format, key=key, source=source,
                            name=config.model.tokenizer or inputs.policy)
        eval_kind, eval_rows = pair_rows(data.format, data.rows, config, source)
        # GDPO rows as the eval of plain pairs are pairs (their level target is not read)
        if kind and eval_kind != kind and (kind, eval_kind) != (PAIRS, LEVEL_PAIRS):
            where = source if inputs.eval_file else f"split {inputs.eval_split!r} of {source}"
            raise ConfigError(f"{key}: {where} gives {eval_kind} data; "
                              f"data.train_file gives {kind}")
        return rows, eval_rows
    if inputs.eval_fraction == 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(config.data.seed).shuffle(order)
    held = max(1, int(len(rows) * inputs.eval_fraction))
    return [rows[i] for i in sorted(order[held:])], [rows[i] for i in sorted(order[:held])]


def _prepare(splits: dict[str, list[dict]], config: Config, paths: dict, tokenizer, run_dir: Path, kind: str,
             inputs: StageInputs) -> dict:
    """Prepared Parquet per split under RUN_DIR/prepared/; returns {"train_path": ..., "eval_path": ...}."""
    from rayalign.data import write_rows_parquet
    from rayalign.prepare import prepare_pairs

    cache_dir = Path(config.ref.cache_dir) if config.ref.cache_dir else run_dir / "ref_cache"
    prepared = prepare_pairs(splits, config, kind=kind, tokenizer=tokenizer, tokenizer_path=paths["tokenizer_path"],
                             reference_path=paths["reference_path"], pad_token_id=tokenizer.pad_token_id,
                             cache_dir=cache_dir, log=_log, reference_in_data=inputs.reference_in_data)
    sizes = ", ".join(f"{name} {len(frame)}" for name, frame in prepared.frames.items())
    _log(f"pairs: {sizes}; 0 dropped; {prepared.prompts_truncated} prompts truncated to "
         f"{config.data.max_prompt_length} tokens (end kept), {prepared.completions_truncated} pairs with a "
         f"completion truncated to {config.data.max_completion_length}")
    out = {}
    for name, frame in prepared.frames.items():
        path = run_dir / "prepared" / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_rows_parquet(frame.to_dict("records"), path)
        out[f"{name}_path"] = str(path)
    return out


def _check_resume(run_dir: Path, resume: bool, store=None) -> None:
    from rayalign.checkpoint import latest_checkpoint
    from rayalign.storage_train import latest_stored_checkpoint

    latest = latest_stored_checkpoint(store, run_dir) if store else latest_checkpoint(run_dir)
    if latest and not resume:
        where = f"run.storage: {store.location(run_dir)}" if store else f"run.dir: {run_dir}"
        raise ConfigError(f"{where} already has checkpoints (newest {latest.name}); "
                          "pass --resume to continue it or choose a new run.dir")
    if resume:
        _log(f"resuming from {latest}" if latest else "--resume: no complete checkpoint yet, starting fresh")
    (run_dir / "FAILED.json").unlink(missing_ok=True)
    if store:
        store.delete(run_dir / "FAILED.json")


def worker_inputs(inputs: StageInputs, store: RunStorage | None) -> StageInputs:
    """`inputs` as the workers read them: SamS's carried state (the previous stage's final/) as an absolute
    path or, with run.storage, its storage location (a worker on another node has no copy of the driver's)."""
    if not inputs.sams_state:
        return inputs
    state = _absolute(inputs.sams_state)
    return dataclasses.replace(inputs, sams_state=store.remote(state) if store else state)


def _absolute(path: str) -> str:
    """A local model path made absolute (the workers run in another directory); hub ids unchanged."""
    return str(Path(path).expanduser().absolute()) if Path(path).expanduser().exists() else path


def run_train(config: Config, *, resume: bool = False, callbacks: tuple = (), prepare_only: bool = False,
              storage=None, inputs: StageInputs | None = None, tracking=None, push_weights: dict | None = None) -> int:
    """Run the training stage; returns the process exit code.

    `callbacks`: extra Ray Train callbacks (a Tune trial passes TuneReportCallback). `prepare_only`: stop
    after the prepared Parquet is written (`rayalign tune` builds the tiny model and warms the shared
    reference cache once in its driver this way). `storage`: the loop's `rayalign.storage.RunStorage`
    (default: run.dir bound to run.storage, if set): workers then read and write through it. `inputs`: what
    this stage trains (models, data, epochs, SPA mix; the loop's per iteration), by default the config's.
    `tracking`: the stage's `rayalign.tracking.TrackingSettings` (the loop's and a sweep's name their stages),
    by default resolved from the config and run.dir. `push_weights`: the loop's persistent generators and
    judges (`rayalign.host_pool.push_target`), which rank 0 sends the final weights to."""
    run_dir = Path(config.run.dir).expanduser().absolute()
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(run_dir)))
    inputs = inputs or StageInputs.from_config(config)
    config = inputs.stage_config(config)  # the loss this stage trains (the loop's iteration 0 may differ)
    started = time.perf_counter()
    store = storage or RunStorage.from_config(config)
    _check_resume(run_dir, resume, store)
    kind, splits, tokenizer, paths = _load_data_and_models(config, inputs, run_dir, store)
    inputs = worker_inputs(inputs, store)
    ensure_ray()
    loaded = time.perf_counter()
    _log(f"data and model ready after {loaded - started:.0f} s")
    paths.update(_prepare(splits, config, paths, tokenizer, run_dir, kind, inputs))
    if prepare_only:
        return 0
    prepared = time.perf_counter()
    if store:
        paths.update(worker_paths(store, paths, run_dir))
    _log(f"prepared after {time.perf_counter() - started:.0f} s; starting {config.train.num_workers} "
         f"{config.train.engine} worker(s)")
    from rayalign.tracking import TrackingSettings

    paths.update(data_kind=kind, inputs=inputs.to_dict(),
                 tracking=(tracking or TrackingSettings.resolve(config, run_dir)).to_dict())
    paths["kill_worker_at"] = os.environ.get("RAYALIGN_KILL_WORKER_AT")  # fault drills (tests), else None
    paths["push_weights"] = push_weights
    if not _fit_or_explain(config, paths, run_dir, callbacks):
        return 1
    return _finish(run_dir, store, load=loaded - started, prepare=prepared - loaded, started=started,
                   fitted_from=prepared)


def _load_data_and_models(config: Config, inputs: StageInputs, run_dir: Path, store) -> tuple:
    """(data kind, {"train": rows, "eval": rows if any}, tokenizer, model paths as the workers open them), after
    the checks that need no Ray: the data against its template, LoRA's target modules."""
    from rayalign.data import load_rows
    from rayalign.models import LoadOptions, load_tokenizer

    if not inputs.train_file:
        raise ConfigError("data.train_file: set it to a preference file (see `rayalign data check`)")
    # A given tokenizer renders conversational rows with its chat template (none: a config error); the tiny
    # model built from the data uses the plain "\n\nHuman:/\n\nAssistant:" template, the readers' fallback.
    tokenizer_path = config.model.tokenizer or inputs.policy
    tokenizer = None
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path, LoadOptions.of(config.model))
    data = load_rows(inputs.train_file, fmt=inputs.format, tokenizer=tokenizer, select=inputs.selection())
    check_data_template(tokenizer, data.format, key="data.train_file", source=inputs.train_file, name=tokenizer_path)
    kind, rows = pair_rows(data.format, data.rows, config, inputs.train_file)  # the data kind, decided once
    texts = [r["prompt"] + ("".join(r["completions"]) if kind == GROUPS else r["chosen"]) for r in rows]
    policy_path = build_policy_if_needed(inputs.policy, config, run_dir, texts)
    if config.model.lora and "://" not in policy_path:  # before Ray starts: a typo is a config error
        from rayalign.lora import check_target_modules

        check_target_modules(policy_path, config.model)
    tokenizer_path = tokenizer_path or policy_path
    tokenizer = tokenizer or load_tokenizer(tokenizer_path, LoadOptions.of(config.model))
    train_rows, eval_rows = split_eval(rows, config, tokenizer, kind, inputs)
    paths = {"policy_path": _absolute(policy_path), "tokenizer_path": _absolute(tokenizer_path),
             "reference_path": _absolute(inputs.reference or policy_path)}
    if store:  # Ray Data actors and workers on other nodes read the models from run.storage
        paths = {key: store.remote(path) for key, path in paths.items()}
    return kind, {"train": train_rows, **({"eval": eval_rows} if eval_rows else {})}, tokenizer, paths


def _fit_or_explain(config: Config, paths: dict, run_dir: Path, callbacks: tuple) -> bool:
    """Runs the fit; on failure says what failed (the worker's own exception, not Ray's wrapper) and where to
    resume from, and returns False."""
    try:
        _fit(config, paths, run_dir, callbacks)
        return True
    except Exception as exc:  # Ray Train wraps worker errors; say what to do rather than dump its traceback
        from rayalign.checkpoint import latest_checkpoint
        from rayalign.errors import failure_line

        latest = latest_checkpoint(run_dir)
        print(f"rayalign train: error: training failed: {failure_line(exc)}\n"
              f"  newest complete checkpoint: {latest or 'none'}; rerun the same command with --resume to continue",
              file=sys.stderr)
        return False


def _finish(run_dir: Path, store, *, load: float, prepare: float, started: float, fitted_from: float) -> int:
    """After a fit: the outputs pulled from run.storage, a worker's recorded failure reported, the stage's timings
    written; the exit code."""
    if store:  # rank 0 published them; run.dir stays the driver's working copy
        pull_outputs(store, run_dir)
    failure = run_dir / "FAILED.json"
    if failure.exists():
        print(f"rayalign train: error: {json.loads(failure.read_text())['error']}", file=sys.stderr)
        return 1
    _write_timings(run_dir, load=load, prepare=prepare, fit=time.perf_counter() - fitted_from)
    if store:  # the iteration's record is rebuilt from it on a --resume from storage
        from rayalign.stage_timing import TRAIN_FILE

        store.publish(run_dir / TRAIN_FILE)
    final_path = run_dir / "final_metrics.json"
    final = json.loads(final_path.read_text()) if final_path.exists() else {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k.startswith("eval/"))
    _log(f"done in {time.perf_counter() - started:.0f} s; {shown or 'no eval split'}; model in {run_dir / 'final'}")
    return 0


def _write_timings(run_dir: Path, *, load: float, prepare: float, fit: float) -> None:
    """RUN_DIR/timings.json: the stage's parts (`rayalign.stage_timing.train_seconds`), with the worker's."""
    from rayalign.stage_timing import TRAIN_FILE, WORKER_FILE, train_seconds

    worker_file = run_dir / WORKER_FILE
    worker = json.loads(worker_file.read_text()) if worker_file.exists() else {}
    seconds = train_seconds(load=load, prepare=prepare, fit=fit, worker=worker)
    atomic_write_text(run_dir / TRAIN_FILE, json.dumps(seconds) + "\n")
    _log("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))


def _fit(config: Config, paths: dict, run_dir: Path, callbacks: tuple = ()) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayalign.train_loop import train_fn_per_worker

    # Ray Train's controller acts on the workers' state once per poll (start, each report, finish), 2 s by
    # default: a short run spent seconds waiting for it. A value the user exported is kept.
    train = config.train
    os.environ[POLL_ENV] = USER_POLL_S or str(poll_interval(train.num_workers))
    gpus = {"GPU": train.gpus_per_worker} if train.use_gpu else {}
    resources = {"CPU": train.cpus_per_worker, **gpus, **train.resources_per_worker}
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": config_to_dict(config), **paths},
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=resources),
        # A fresh Ray run name per attempt: resuming is ours (checkpoints/step-N), not Ray's run state.
        run_config=RunConfig(name=f"train-{time.strftime('%Y%m%d-%H%M%S')}",
                             **ray_storage(paths, run_dir),
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             callbacks=list(callbacks)),
    )
    trainer.fit()
