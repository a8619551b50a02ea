"""What one training stage trains: its run state, kept apart from the user's settings.

`rayalign train` takes these from the config the user wrote (`StageInputs.from_config`); the iterative loop
builds them per iteration (the previous model as policy and reference, the iteration's judged data, its
epochs, SPA's mix for that iteration, the loss when it differs from `loss.type`: DPO on iteration 0's gold
seed pairs for a K-sample loss, and the SamS scheduler state to continue from) and passes them to
`rayalign.train.run_train`, which hands them to the Ray Train workers next to the unchanged config. So
`config` stays what the user wrote, and no worker recomputes run state from settings. Torch-free, no I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class StageInputs:
    """Models, data and length of one training stage, and its SPA self-refinement."""

    policy: str = ""  # "": build the tiny local model from the data (as model.policy)
    reference: str | None = None  # None: the initial policy
    train_file: str = ""
    eval_file: str | None = None
    eval_fraction: float = 0.0
    split: str = "train"  # of train_file (data.split); the loop's own Parquet files have only "train"
    eval_split: str | None = None  # held-out pairs from this split of train_file (data.eval_split)
    subset: str | None = None  # of train_file (data.subset)
    format: str | None = None  # None: detect per file
    epochs: int = 1
    spa_mix: float | None = None  # SPA self-refinement's mix = 1 + lambda; None: no refinement
    loss_type: str | None = None  # None: the config's loss.type
    # train_file's rows carry the reference's log-probs (the loop's judged data: its judge, pi_{i-1}, is the
    # reference): read them instead of scoring the reference (`rayalign.prepare.reference_from_rows`)
    reference_in_data: bool = False
    # SamS: a directory whose `sams.pt` the pair selector continues from (the loop's previous iteration's
    # final/), so the bandit keeps learning across iterations; None: a fresh selector. A checkpoint of this
    # stage, when resuming, wins over it.
    sams_state: str | None = None

    def stage_config(self, config):
        """`config` as this stage runs it: `loss.type` replaced when the stage trains another loss, the rest
        (the other loss settings included) as the user wrote it. The caller's config is not changed."""
        if self.loss_type is None or self.loss_type == config.loss.type:
            return config
        return dataclasses.replace(config, loss=dataclasses.replace(config.loss, type=self.loss_type))

    @classmethod
    def from_config(cls, config) -> StageInputs:
        """The inputs a `Config` asks for when it runs one stage on its own (`rayalign train`, a Tune trial)."""
        spa, data = config.spa, config.data
        return cls(policy=config.model.policy, reference=config.model.reference, train_file=data.train_file,
                   eval_file=data.eval_file, eval_fraction=data.eval_fraction, split=data.split,
                   eval_split=data.eval_split, subset=data.subset, format=data.format,
                   epochs=config.train.epochs, spa_mix=spa.mix_for(spa.iteration) if spa.refine else None)

    def selection(self, *, evaluation: bool = False):
        """The `rayalign.data.Selection` of train_file's training (or, `evaluation`, held-out) split."""
        from rayalign.data.readers import Selection

        if evaluation:
            return Selection(split=self.eval_split, subset=self.subset, split_key="data.eval_split")
        return Selection(split=self.split, subset=self.subset)

    def to_dict(self) -> dict:
        """Plain values for Ray Train's `train_loop_config`; `StageInputs(**d)` reads them back."""
        return dataclasses.asdict(self)
