"""Config sections of the loop around the update: SPA refinement, SamS, Tune sweeps, the loop, its evaluation,
run storage.

Part of the schema in `rayalign.config` (re-exported there); split out only to keep files small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rayalign.config_checks import _one_of, _positive, _require

LOGGERS = ("tensorboard", "wandb", "mlflow")  # run.loggers (rayalign.tracking)


@dataclass(frozen=True)
class SpaConfig:
    """SPA self-refinement (ALGORITHMS.md §5); mix = 1 + lambda extrapolates away from the reference."""

    refine: bool = False
    alpha: float = 0.1
    k_fraction: float = 0.1
    window: int = 50
    warm_start: float = 0.2
    mix_schedule: tuple[float, ...] = (1.5, 1.25, 1.125)
    # the iteration whose mix_schedule entry a stand-alone `rayalign train` uses (1-based); the loop passes
    # each iteration's mix to its training stage itself (`rayalign.stage_inputs`) and leaves this as written
    iteration: int = 1

    def __post_init__(self):
        _require(0.0 <= self.alpha < 0.5, "spa.alpha", f"must be in [0, 0.5); got {self.alpha}")
        _require(0.0 < self.k_fraction < 1.0, "spa.k_fraction", "must be in (0, 1)")
        j = int(self.window * self.k_fraction + 1e-9)
        _require(j + 1 < self.window, "spa.window", f"too small for spa.k_fraction={self.k_fraction}")
        _require(0.0 <= self.warm_start < 1.0, "spa.warm_start", "must be in [0, 1)")
        _require(all(m >= 1.0 for m in self.mix_schedule), "spa.mix_schedule",
                 "entries are mix = 1 + lambda >= 1 (extrapolation, not interpolation towards the reference)")
        _require(len(self.mix_schedule) > 0, "spa.mix_schedule", "needs at least one entry")
        _positive(self.iteration, "spa.iteration")

    def mix_for(self, iteration: int) -> float:
        """mix = 1 + lambda of loop iteration `iteration` (1-based); iterations past the schedule keep its last
        entry."""
        return self.mix_schedule[min(iteration, len(self.mix_schedule)) - 1]


@dataclass(frozen=True)
class SamsConfig:
    """SamS batch-wise sample scheduling (ALGORITHMS.md §6); sizes suit tiny models."""

    enabled: bool = False
    ratio: float = 0.5
    explore_weight: float = 0.1
    batch_reward_weight: float = 0.5  # gamma
    margin_weight: float = 0.5  # delta
    pool_size: int = 500
    pool_batches: int = 8
    warmup_fraction: float = 0.05
    encoder_dim: int = 64
    width: int = 256
    depth: int = 4
    dropout: float = 0.1
    lr: float = 1e-3
    updates_per_round: int = 2
    regrad: bool = False
    # bandit: the SamS scheduler; random: a seeded random ratio of each batch; top_rs: the K pairs with the
    # highest sample reward r_S, no network (the two baselines the spec asks SamS to be reported against)
    selector: str = "bandit"

    def __post_init__(self):
        _one_of(self.selector, "sams.selector", ("bandit", "random", "top_rs"))
        _require(0.0 < self.ratio <= 1.0, "sams.ratio", f"must be in (0, 1]; got {self.ratio}")
        for key in ("batch_reward_weight", "margin_weight", "warmup_fraction"):
            _require(0.0 <= getattr(self, key) <= 1.0, f"sams.{key}", "must be in [0, 1]")
        for key in ("pool_size", "encoder_dim", "width", "depth", "lr", "updates_per_round"):
            _positive(getattr(self, key), f"sams.{key}")


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune sweep (`rayalign tune`): `space` maps dotted config keys to {grid|choice|uniform|loguniform: ...}
    (parsed and checked against the rest of the config by `rayalign.tune_space`)."""

    space: dict[str, Any] = field(default_factory=dict)
    metric: str = "eval/rewards/accuracies"  # any eval/* metric training reports
    mode: str = "max"
    num_samples: int = 1  # samples of the space (each repeats the whole grid)
    scheduler: str = "none"  # asha: stop weak trials early on their evaluations (train.eval_every)
    grace_period: int = 1  # ASHA: evaluations every trial gets before it can be stopped
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs (and GPUs) fit trials' train workers

    def __post_init__(self):
        _one_of(self.mode, "tune.mode", ("max", "min"))
        _one_of(self.scheduler, "tune.scheduler", ("none", "asha"))
        _positive(self.num_samples, "tune.num_samples")
        _positive(self.grace_period, "tune.grace_period")
        _require(self.max_concurrent_trials >= 0, "tune.max_concurrent_trials", "must be >= 0 (0: as many as fit)")


@dataclass(frozen=True)
class LoopConfig:
    """The iterative SPA loop: iteration 0 is DPO on gold seed pairs, then self-judged iterations."""

    iterations: int = 3
    seed_epochs: int = 3
    iteration_epochs: int = 1
    prompts_per_iteration: int = 64  # 0 with data.prompts_file: split the file evenly across iterations
    task: str = "sentiment"  # an embedded task with a gold reward, or "none" (no win rates)
    seed_pairs: int = 128  # gold-labelled pairs of the task for iteration 0 (when data.train_file is empty)
    sft_examples: int = 1200  # task SFT corpus size (used when model.policy is empty)
    sft_epochs: int = 2
    sft_lr: float = 3e-3
    # What labels an iteration's samples: "judge" (judge.type: SPA's implicit reward of the previous model, or a
    # reward model) or "gold" (the task's reward). Pairwise losses take the best vs the worst sample,
    # exo_rw/dpo_rw all K of them.
    rewards: str = "judge"

    def __post_init__(self):
        _require(self.iterations >= 0, "loop.iterations", "must be >= 0")
        _one_of(self.task, "loop.task", ("sentiment", "none"))
        _one_of(self.rewards, "loop.rewards", ("judge", "gold"))
        _require(self.rewards == "judge" or self.task == "sentiment", "loop.rewards",
                 "gold needs a task with a gold reward (loop.task=sentiment)")
        for key in ("seed_epochs", "iteration_epochs", "seed_pairs", "sft_examples", "sft_epochs",
                    "sft_lr"):
            _positive(getattr(self, key), f"loop.{key}")
        _require(self.prompts_per_iteration >= 0, "loop.prompts_per_iteration", "must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """The loop's per-iteration evaluation (and `rayalign eval`): every model samples the same held-out prompts.

    Reported for each model: KL to pi_SFT; with loop.task=sentiment the gold reward's win rates; with
    `reward_model` that model's win rates and mean reward (`rm/*` keys), on any task.
    """

    prompts: int = 64  # held-out prompts every model is evaluated on (was loop.eval_prompts)
    reward_model: str | None = None  # an AutoModelForSequenceClassification (num_labels=1): local dir or hub id

    def __post_init__(self):
        _positive(self.prompts, "eval.prompts")
        _require(self.reward_model is None or bool(self.reward_model.strip()), "eval.reward_model",
                 "must name a reward model (a local directory or a hub id), or be null")


@dataclass(frozen=True)
class RunDirConfig:
    """Where a command writes: `run.dir` (a fresh `runs/<timestamp>` when unset)."""

    dir: str | None = None
    # The run's durable copy for multi-node runs: a local path (a shared mount) or a pyarrow filesystem URI,
    # e.g. s3://bucket/runs/x; run.dir is then the driver's working copy (see rayalign.storage).
    storage: str | None = None
    # Bound of each node's cache of storage copies (models, data, checkpoints), least recently used evicted
    # first, entries in use never; 0: unbounded (see rayalign.storage_cache).
    cache_max_gb: float = 50.0
    name: str = "rayalign"
    # Experiment tracking (rayalign.tracking): any of tensorboard (RUN_DIR/tb), wandb, mlflow; [] logs nothing
    # beyond metrics.jsonl. The same metric names, the resolved config and the report's plots go to each.
    loggers: tuple[str, ...] = ("tensorboard",)
    project: str = "rayalign"  # W&B project and MLflow experiment
    # MLflow: a server URL, a database URI or a directory; None: MLFLOW_TRACKING_URI, else RUN_DIR/mlruns
    tracking_uri: str | None = None

    def __post_init__(self):
        _require(self.cache_max_gb >= 0, "run.cache_max_gb", f"must be >= 0 (0: unbounded); got {self.cache_max_gb}")
        for logger in self.loggers:
            _one_of(logger, "run.loggers", LOGGERS)
        _require(len(set(self.loggers)) == len(self.loggers), "run.loggers", f"lists a logger twice: {self.loggers}")
        _require(bool(self.project.strip()), "run.project", "must not be empty")
