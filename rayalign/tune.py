"""`rayalign tune CONFIG [key=value ...] [--resume]`: a Ray Tune sweep whose trials are `rayalign train` runs.

    driver: validate tune.space (no Ray yet) -> build the tiny model and warm the shared reference cache
            once -> Tuner(run_trial).fit() -> RUN_DIR/tune/results.{csv,md}, plots, best.yaml
    trial:  run_trial(params) -> run_train(trial config) with its own TorchTrainer, whose reports reach Tune
            through TuneReportCallback

Under Ray Train V2 `Tuner(TorchTrainer)` is rejected, so each trial is a function trainable that builds
its TorchTrainer (`rayalign.train.run_train`); the trial actor itself holds 0.01 CPU and its training
workers hold what `train.*` asks for. Layout: RUN_DIR/tune/trials/<trial>/ is a normal train run dir,
RUN_DIR/tune/ref_cache/ the shared reference cache, RUN_DIR/tune/experiment/ Ray Tune's own state
(`--resume` restores it with `Tuner.restore`; finished trials are kept, unfinished ones continue from their
newest checkpoint). Trial actors run on the driver's node, where those are; with run.storage each trial
trains in its own location there (STORAGE/tune/trials/<trial>) and the summary files are published to it.
It does not pick the search algorithm (Tune's default: grid + random sampling).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path

from rayalign.config import Config, ConfigError, TuneConfig
from rayalign.config_loader import config_to_dict, dump_config
from rayalign.io import atomic_write_text
from rayalign.loss_registry import DISPERSION_KEYS, needs_dispersion
from rayalign.run_dir import SWEEP_FILE, check_existing_sweep
from rayalign.tune_space import Dimension, check_space, grid_size, parse_space, trial_config

EXPERIMENT = "experiment"  # Ray Tune's state under RUN_DIR/tune/
WARM_FILE = "prepared.json"  # written once the model is built and the reference cache is warm
# Swept keys that can change the reference cache's key (`rayalign.prepare.scoring_settings` decides exactly
# which trials share an entry): the driver warms one entry per distinct setting among their values.
CACHE_SECTIONS = ("model", "data", "ref")
CACHE_KEYS = (*DISPERSION_KEYS, "loss.logit_temperature", "train.padding_free")


def _log(message: str) -> None:
    print(f"rayalign tune: {message}", flush=True)


def _with_run(config: Config, run_dir: Path, key: str) -> Config:
    """`config` running in `run_dir`; with run.storage, in its own location there (`key`, mirroring RUN_DIR),
    so that trials never share one storage root."""
    from rayalign.storage import join

    storage = join(config.run.storage, key) if config.run.storage else None
    return dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(run_dir), storage=storage))


def _local(path: str | None) -> str | None:
    """An existing local path made absolute; hub ids, URIs and None unchanged."""
    return str(Path(path).expanduser().absolute()) if path and Path(path).expanduser().exists() else path


def sweep_base(config: Config) -> Config:
    """What every trial starts from: the sweep's config with the shared reference cache, absolute local paths
    (Ray Tune runs each trial in its own working directory) and no tune section."""
    tune_dir = Path(config.run.dir) / "tune"
    ref = dataclasses.replace(config.ref, cache_dir=_local(config.ref.cache_dir) or str(tune_dir / "ref_cache"))
    data = dataclasses.replace(config.data, train_file=_local(config.data.train_file) or "",
                               eval_file=_local(config.data.eval_file), prompts_file=_local(config.data.prompts_file))
    model = dataclasses.replace(config.model, policy=_local(config.model.policy) or "",
                                reference=_local(config.model.reference), tokenizer=_local(config.model.tokenizer))
    return dataclasses.replace(config, model=model, data=data, ref=ref, tune=TuneConfig())


def check_sweep(config: Config, dims: list[Dimension], trial_configs: list[Config]) -> None:
    """Sweep-level rules every trial must meet, before any Ray work."""
    from rayalign.objective import METRIC_NAMES
    from rayalign.step import GAP_METRIC

    tune = config.tune
    # The GDPO gap is reported only for eval rows in the GDPO belief format (a trial without it fails in Tune).
    names = [f"eval/{name}" for name in (*METRIC_NAMES, GAP_METRIC)]
    if tune.metric not in names:
        raise ConfigError(f"tune.metric: {tune.metric!r} is not reported by training; use one of {', '.join(names)}")
    for trial in [config, *trial_configs]:
        if not (trial.data.eval_file or trial.data.eval_split or trial.data.eval_fraction > 0):
            raise ConfigError("tune.metric: eval metrics need held-out pairs; set data.eval_fraction, "
                              "data.eval_split or data.eval_file")
        if tune.scheduler == "asha" and trial.train.eval_every <= 0:
            raise ConfigError("tune.scheduler: asha stops trials on intermediate evaluations; set "
                              "train.eval_every > 0")
    fixed = ("model.policy", "model.tokenizer", "data.train_file", "data.split", "data.subset", "data.format")
    swept = [d.key for d in dims if d.key in fixed]
    if not config.model.policy and swept:
        raise ConfigError(f"tune.space.{swept[0]}: with model.policy empty the sweep builds one tiny model from "
                          "the data for all trials; set model.policy to sweep this key")


def _cache_settings(config: Config, *, entropy: bool | None = None) -> str:
    from rayalign.prepare import scoring_settings

    tree = config_to_dict(config)
    return json.dumps({**{s: tree[s] for s in CACHE_SECTIONS}, **scoring_settings(config, entropy=entropy)},
                      sort_keys=True)


def _affects_cache(key: str) -> bool:
    return key.split(".")[0] in CACHE_SECTIONS or key in CACHE_KEYS


def warm_configs(base: Config, dims: list[Dimension]) -> list[Config]:
    """One trial config per distinct cache setting among the values trials can take (ranges excepted). A
    setting without the reference entropies is left out where one with them is otherwise the same: its
    entry serves both (`rayalign.prepare.prepare_pairs` reads it), so DPO and MallowsPO share one pass."""
    relevant = [d for d in dims if d.kind in ("grid", "choice") and _affects_cache(d.key)]
    distinct: dict[str, Config] = {}
    for values in itertools.product(*(d.values for d in relevant)):
        trial = trial_config(base, dict(zip((d.key for d in relevant), values)))
        distinct.setdefault(_cache_settings(trial), trial)
    with_entropy = {settings for settings, c in distinct.items() if needs_dispersion(c.loss)}
    return [c for c in distinct.values()
            if needs_dispersion(c.loss) or _cache_settings(c, entropy=True) not in with_entropy]


def warm_up(base: Config, dims: list[Dimension], tune_dir: Path) -> Config:
    """Build the tiny model (if model.policy is empty) and score the reference once per cache setting, in the
    driver, so that concurrent trials read the cache instead of racing to compute it. Returns the base
    config with model.policy set to the model every trial trains."""
    from rayalign.train import run_train

    marker = tune_dir / WARM_FILE
    if marker.exists():  # --resume of the same sweep (checked): the model and the cache are there
        policy = json.loads(marker.read_text())["model.policy"]
        _log(f"the sweep's model and reference cache were prepared before ({marker}); trials read them")
        return dataclasses.replace(base, model=dataclasses.replace(base.model, policy=policy))

    def prepare(config: Config) -> None:
        if run_train(_with_run(config, tune_dir, "tune"), prepare_only=True) != 0:
            raise ConfigError(f"run.dir: preparing the sweep's data in {tune_dir} failed")

    done = set()
    if not base.model.policy:
        # rayalign.train builds the tiny model into RUN_DIR/tiny-model, then scores with it as the reference:
        # with the first setting to warm, so that this pass is one of the warm-up's
        first = warm_configs(base, dims)[0]
        prepare(first)
        model = tune_dir / "tiny-model"
        base, first = (dataclasses.replace(c, model=dataclasses.replace(c.model, policy=str(model)))
                       for c in (base, first))
        done.add(_cache_settings(first))  # what that pass scored: the built model is its reference
        _log(f"every trial trains the tiny model built once from the data: {model}")
    configs = warm_configs(base, dims)
    for config in configs:
        if _cache_settings(config) not in done:
            prepare(config)
    atomic_write_text(marker, json.dumps({"model.policy": base.model.policy, "settings": len(configs)}) + "\n")
    ranged = [d.key for d in dims if d.kind not in ("grid", "choice") and _affects_cache(d.key)]
    _log(f"reference cache warm for {len(configs)} setting(s) in {base.ref.cache_dir}; trials read it (their "
         "logs say 'reference cache hit')" + (f"; {', '.join(ranged)} vary per trial: those score their own"
                                               if ranged else ""))
    return base


def run_trial(params: dict, *, base: Config, trials_dir: str, tracking=None) -> None:
    """Ray Tune function trainable: one `rayalign train` run in RUN_DIR/tune/trials/<trial name>/.

    tracking: the sweep's `rayalign.tracking.TrackingSettings`; each trial is a run of its group."""
    import ray.data
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rayalign.checkpoint import latest_checkpoint
    from rayalign.run_dir import prepare_run_dir
    from rayalign.train import run_train

    name = ray.tune.get_context().get_trial_name()
    run_dir = Path(trials_dir) / name
    final = run_dir / "final_metrics.json"  # written last, after final/ (rayalign.train_loop)
    if final.exists():  # finished, but killed before Tune recorded it (it saves its state every >= 10 s)
        print(f"rayalign tune: {name} already finished in {run_dir}; reporting its final metrics", flush=True)
        ray.tune.report(json.loads(final.read_text()))
        return
    ray.data.DataContext.get_current().enable_progress_bars = False  # bars of many trials garble the table
    config = prepare_run_dir(_with_run(trial_config(base, params), run_dir, f"tune/trials/{name}"))
    # A trial restored by --resume continues from its newest checkpoint (Tune itself keeps none).
    resume = latest_checkpoint(config.run.dir) is not None
    stage = tracking and tracking.stage(f"tune/trials/{name}", run_dir)
    code = run_train(config, resume=resume, callbacks=(TuneReportCallback(),), tracking=stage)
    if code != 0:
        raise RuntimeError(f"trial {name}: rayalign train exited with {code}; see {config.run.dir}")


def trial_name(trial) -> str:
    """Tune's trial name and directory name: `trial_<id>` (short, and stable across --resume)."""
    return f"trial_{trial.trial_id}"


def _param_space(dims: list[Dimension]) -> dict:
    from ray import tune

    kinds = {"grid": tune.grid_search, "choice": tune.choice,
             "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {d.key: kinds[d.kind](list(d.values)) for d in dims}


def _concurrency(config: Config) -> int:
    """tune.max_concurrent_trials, or (0) as many trials as the cluster's CPUs and GPUs fit at once (a fraction of a
    GPU per worker, train.gpus_per_worker, packs several trials onto one GPU)."""
    import ray

    if config.tune.max_concurrent_trials:
        return config.tune.max_concurrent_trials
    train, total = config.train, ray.cluster_resources()
    fits = int(total.get("CPU", 1) // (train.num_workers * train.cpus_per_worker))
    if train.use_gpu:
        fits = min(fits, int(round(total.get("GPU", 0) / (train.num_workers * train.gpus_per_worker), 6)))
    return max(1, fits)


def _tuner(config: Config, base: Config, dims: list[Dimension], resume: bool):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from rayalign.tracking import TrackingSettings

    tune_dir = Path(config.run.dir) / "tune"
    # A trial actor only drives its TorchTrainer: a sliver of a CPU (0 is rejected), on the driver's node,
    # where RUN_DIR, the shared cache and the built model are (its training workers go anywhere).
    resources = {"cpu": 0.01, f"node:{ray.util.get_node_ip_address()}": 0.001}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, trials_dir=str(tune_dir / "trials"),
                             tracking=TrackingSettings.resolve(config, config.run.dir)), resources)
    experiment = tune_dir / EXPERIMENT
    if resume and tune.Tuner.can_restore(str(experiment)):
        done = sorted(p.parent.name for p in (tune_dir / "trials").glob("*/final_metrics.json"))
        _log(f"resuming the sweep in {experiment}: {len(done)} finished trial(s) kept ({', '.join(done) or 'none'}); "
             "unfinished and failed ones run, from their newest checkpoint")
        return tune.Tuner.restore(str(experiment), trainable=trainable, restart_errored=True)
    settings = config.tune
    scheduler = None
    if settings.scheduler == "asha":  # time is counted in reports, i.e. evaluations (train.eval_every)
        scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=settings.grace_period)
    concurrent = _concurrency(config)
    _log(f"{grid_size(dims, settings.num_samples)} trial(s), up to {concurrent} at a time; metric "
         f"{settings.metric} ({settings.mode})")
    return tune.Tuner(
        trainable, param_space=_param_space(dims),
        tune_config=tune.TuneConfig(metric=settings.metric, mode=settings.mode, num_samples=settings.num_samples,
                                    scheduler=scheduler, max_concurrent_trials=concurrent,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(tune_dir)))


def _init_ray() -> None:
    """Start (or join) Ray for the sweep.

    A local instance gets an explicit dashboard port, exported to every worker as RAY_API_SERVER_ADDRESS:
    when Tune stops a trial early its TorchTrainer controller dies with it, and Ray Train's detached
    PlacementGroupCleaner frees the trial's worker resources only if the state API finds this cluster,
    which its auto-detection cannot when other Ray instances run on the same machine (the trials after
    it would wait for CPUs forever)."""
    import socket

    import ray

    from rayalign.train import ensure_ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        ensure_ray()
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    from rayalign.ray_session import init_ray  # these settings apply only if it starts a local Ray

    init_ray(dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})


def run_tune(config: Config, *, resume: bool = False) -> int:
    """Run (or with `resume`, continue) the sweep; returns the process exit code."""
    from rayalign.stage_storage import StageStorage
    from rayalign.tune_report import collect_trials, write_reports

    tune_dir = Path(config.run.dir) / "tune"
    dims = parse_space(config.tune.space)
    base = sweep_base(config)
    check_sweep(config, dims, check_space(base, dims))
    check_existing_sweep(config, tune_dir, resume)
    atomic_write_text(tune_dir / SWEEP_FILE, dump_config(config))
    _init_ray()
    base = warm_up(base, dims, tune_dir)
    results = _tuner(config, base, dims, resume).fit()
    trials = collect_trials(results, dims, tune_dir, config.tune.metric)
    StageStorage(config).commit(*write_reports(tune_dir, trials, config.tune))  # to run.storage, if set
    failed = [t.name for t in trials if t.status == "ERROR"]
    if failed:
        _log(f"error: {len(failed)} trial(s) failed: {', '.join(failed)}; `--resume` reruns them")
        return 1
    unfinished = [t.name for t in trials if t.status == "STOPPED"]
    if unfinished and config.tune.scheduler == "none":  # nothing stops trials early: the sweep was interrupted
        _log(f"{len(unfinished)} trial(s) did not finish: {', '.join(unfinished)}; `--resume` continues them")
        return 1
    return 0
