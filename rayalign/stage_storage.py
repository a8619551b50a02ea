"""Where the loop's stages meet run storage (`run.storage`): one object per run, used at every stage boundary.

    inputs(*paths)     what a stage's actors read, as paths they can open on any node: storage locations of
                       the driver's models and files (published once), hub ids and URIs unchanged
    commit(*outputs)   publish what the stage wrote, in order: its completion marker is passed last
    training(run_dir)  the training stage's own location (STORAGE/<its run dir>) and the run's storage, which
                       `rayalign.train.run_train` hands to its workers

Without run.storage `inputs` returns the paths, `commit` does nothing and `training` gives (None, None),
so no stage asks whether storage is set. It holds no state beyond the run's `RunStorage`.

The loop builds it once (`rayalign.loop.Plan.storage`); a one-stage command builds its own.
Not here (they are the node side of a stage): the actors' `materialize` of the locations they are given,
once in each actor's constructor (generate, judge, prepare), and the Ray Train workers' scratch run dir,
checkpoints and final/ (`rayalign.storage_train`, used by train.py and train_loop.py). `--resume` is
`rayalign.storage_resume`.
"""

from __future__ import annotations

from pathlib import Path

from rayalign.storage import RunStorage


class StageStorage:
    def __init__(self, config):
        self.store = RunStorage.from_config(config)

    def inputs(self, *paths: str) -> list[str]:
        """Paths the stage's actors read, valid on every node (run.storage: published once, then located)."""
        return [self.store.remote(str(p)) if self.store and p else p for p in paths]

    def commit(self, *outputs: str | Path) -> None:
        """Publish `outputs` in this order, the stage's completion marker last; nothing without run.storage."""
        if self.store:
            self.store.publish(*outputs)

    def training(self, run_dir: str | Path) -> tuple[str | None, RunStorage | None]:
        """(the training stage's run.storage: STORAGE/<run_dir>, the run's storage), or (None, None)."""
        return (self.store.location(run_dir), self.store) if self.store else (None, None)
