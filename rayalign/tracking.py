"""Experiment tracking: the same metric names, the resolved config and the report's plots to each of `run.loggers`.

Loggers (`run.loggers`; default `[tensorboard]`, as before):
- `tensorboard`: event files in the stage's `RUN_DIR/tb/`;
- `wandb`: the Weights & Biases client. WANDB_MODE (e.g. `offline`), WANDB_DIR (default: the run directory,
  which gets a `wandb/` folder; `wandb sync` uploads offline runs) and WANDB_ENTITY are read on the driver;
- `mlflow`: an `MlflowClient` on `run.tracking_uri`, else MLFLOW_TRACKING_URI, else the run directory's
  `mlruns/` (MLflow's file store, which rayalign opts in to with MLFLOW_ALLOW_FILE_STORE; a database URI
  needs the full `mlflow` package, a server URL only `mlflow-skinny`).

Who logs: each training stage (`rayalign train`, every update of the loop, every Tune trial) is one tracker
run, written by training rank 0 step by step with `metrics.jsonl`'s names and step numbers; the loop is one
run of its per-iteration records (step = iteration) and, at the end, the report's plots. Every run gets the
resolved config (W&B config; MLflow parameters `section.key` plus a `config.yaml` artifact; TensorBoard
text). A command's runs share the W&B project / MLflow experiment `run.project` and a group, the name of
its run directory; a stage's run is named `GROUP/iter-1/train` (loop) or `GROUP/tune/trials/ID` (sweep).

`TrackingSettings` is resolved once on the driver and travels to the workers as plain values, so the nodes
need no environment of their own, except credentials (W&B online: `wandb login` or WANDB_API_KEY where
training rank 0 runs; an MLflow server's own). A resumed stage starts a new tracker run with the same name
and group (the loop's replays its earlier records first), so redone steps never mix with logged ones.
A logger whose package is missing is a ConfigError naming `run.loggers` before anything runs
(`check_loggers`). wandb and mlflow are imported only here, and only when chosen. Nothing here computes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from rayalign.config_checks import ConfigError
from rayalign.config_loop import LOGGERS

_PACKAGES = dict(zip(LOGGERS, ("tensorboard", "wandb", "mlflow")))  # the package each logger imports
AXES = ("step", "epoch", "iteration")  # the x axis of a record, not a metric of it
_MLFLOW_BATCH = 100  # MLflow accepts at most 100 parameters per log_batch call


def check_loggers(loggers) -> None:
    """ConfigError naming `run.loggers` for a logger whose package is not installed."""
    for name in loggers:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            extra = "" if name == "tensorboard" else " (pip install 'rayalign[tracking]')"
            raise ConfigError(f"run.loggers: {name} needs the {_PACKAGES[name]} package, which is not installed"
                              f"{extra}; install it or remove {name}")


def _tracking_uri(value: str) -> str:
    """A tracking URI as given, a plain path made an absolute file URI (the workers run elsewhere)."""
    if urlparse(value).scheme or value.startswith("databricks"):
        return value
    return Path(value).expanduser().absolute().as_uri()


@dataclass(frozen=True)
class TrackingSettings:
    """Where one tracker run logs; plain values, resolved on the driver (`resolve`)."""

    loggers: tuple[str, ...] = ("tensorboard",)
    project: str = "rayalign"  # W&B project, MLflow experiment
    group: str = "rayalign"  # the command's run: a W&B group, an MLflow tag
    name: str = "rayalign"  # this tracker run
    run_dir: str = ""  # tagged on the run
    mlflow_uri: str | None = None
    wandb_mode: str | None = None  # None: W&B's own default (online)
    wandb_dir: str | None = None
    wandb_entity: str | None = None

    @classmethod
    def resolve(cls, config, run_dir: str | Path) -> TrackingSettings:
        """The settings of the command running `config` in `run_dir`, with the environment read here."""
        run_dir = Path(run_dir).expanduser().absolute()
        env, loggers = os.environ, tuple(config.run.loggers)
        uri = config.run.tracking_uri or env.get("MLFLOW_TRACKING_URI") or str(run_dir / "mlruns")
        return cls(loggers=loggers, project=config.run.project, group=run_dir.name, name=run_dir.name,
                   run_dir=str(run_dir), mlflow_uri=_tracking_uri(uri) if "mlflow" in loggers else None,
                   wandb_mode=env.get("WANDB_MODE") or None, wandb_dir=env.get("WANDB_DIR") or str(run_dir),
                   wandb_entity=env.get("WANDB_ENTITY") or None)

    def stage(self, name: str, run_dir: str | Path) -> TrackingSettings:
        """A stage of this command (`iter-1/train`): its own run, in the same group, project and stores."""
        return dataclasses.replace(self, name=f"{self.group}/{name}", run_dir=str(run_dir))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> TrackingSettings:
        return cls(**{**(values or {}), "loggers": tuple((values or {}).get("loggers", cls.loggers))})


def numbers(record: dict) -> dict[str, float]:
    """The metrics of a record: its numeric values, the axes (`AXES`) and None left out."""
    return {key: float(value) for key, value in record.items()
            if key not in AXES and isinstance(value, (int, float)) and not isinstance(value, bool)}


def flat_config(config: dict) -> dict[str, str]:
    """{"section.key": str(value)} of a `config_to_dict` dict (MLflow parameters are strings)."""
    return {f"{section}.{key}": str(value) for section, body in config.items() for key, value in body.items()}


class _TensorBoard:
    def __init__(self, tb_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events of the steps being redone (a resume), like the JSONL truncation
        self.writer = SummaryWriter(str(tb_dir), purge_step=purge_step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_config(self, config: dict) -> None:
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat_config(config).items()))

    def log_images(self, paths: list[Path], step: int) -> None:
        import matplotlib.image

        for path in paths:
            self.writer.add_image(f"plots/{path.stem}", matplotlib.image.imread(path)[..., :3], step,
                                  dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, settings: TrackingSettings):
        import wandb

        self.wandb = wandb
        Path(settings.wandb_dir).mkdir(parents=True, exist_ok=True)
        # console="off": W&B would otherwise wrap the process's stdout (a Ray worker's log and progress bar)
        self.run = wandb.init(project=settings.project, entity=settings.wandb_entity, group=settings.group,
                              name=settings.name, dir=settings.wandb_dir, mode=settings.wandb_mode,
                              tags=["rayalign"], reinit="create_new", settings=wandb.Settings(console="off"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_config(self, config: dict) -> None:
        self.run.config.update(config)

    def log_images(self, paths: list[Path], step: int) -> None:
        self.run.log({f"plots/{p.stem}": self.wandb.Image(str(p)) for p in paths}, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, settings: TrackingSettings):
        import atexit

        if settings.mlflow_uri.startswith("file:"):  # MLflow 3 refuses its file store unless opted in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=settings.mlflow_uri)
        tags = {"rayalign.group": settings.group, "rayalign.run_dir": settings.run_dir}
        run = self.client.create_run(self._experiment(settings.project), run_name=settings.name, tags=tags)
        self.run_id, self.ended = run.info.run_id, False
        atexit.register(self._end, "FAILED")  # a process that dies before close() leaves no RUNNING run

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001  (another stage created it first: use that one)
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flat_config(config).items()]  # MLflow's value length limit
        for start in range(0, len(params), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + _MLFLOW_BATCH])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def log_images(self, paths: list[Path], step: int) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), "plots")

    def _end(self, status: str) -> None:
        if not self.ended:
            self.ended = True
            self.client.set_terminated(self.run_id, status=status)

    def close(self) -> None:
        import atexit

        self._end("FINISHED")
        atexit.unregister(self._end)


class Trackers:
    """One tracker run on each of `settings.loggers`; every call goes to all of them.

    tb_dir: where TensorBoard writes (the stage's RUN_DIR/tb). purge_step: TensorBoard hides earlier events
    from that step on (a resume redoes them). config: the resolved config (`config_to_dict`), logged once.
    """

    def __init__(self, settings: TrackingSettings, *, tb_dir: str | Path, config: dict | None = None,
                 purge_step: int | None = None):
        opened = {"tensorboard": lambda: _TensorBoard(Path(tb_dir), purge_step),
                  "wandb": lambda: _WandB(settings), "mlflow": lambda: _MLflow(settings)}
        self.backends = [opened[name]() for name in settings.loggers]
        for backend in self.backends if config else ():
            backend.log_config(config)

    def log(self, record: dict, step: int) -> None:
        """The numeric values of `record` (`numbers`) at `step`."""
        metrics = numbers(record)
        for backend in self.backends if metrics else ():
            backend.log(metrics, step)

    def log_images(self, paths: list[Path], step: int) -> None:
        for backend in self.backends if paths else ():
            backend.log_images([Path(p) for p in paths], step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
