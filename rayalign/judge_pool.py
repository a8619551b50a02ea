"""Judges that live for a whole `rayalign run` (`judge.persistent=true`), the policy's weights pushed in memory.

Each `JudgeHost` actor builds one `rayalign.judge.Judge` (the policy, pi_SFT, the reward models) on the first
pass, and afterwards takes each new policy's weights in memory (`rayalign.host_pool`: pushed by the training
stage, or loaded from the model's files by a stale host); pi_SFT, which the loop never changes, stays loaded.
A pass's judging is still a Ray Data stage chained onto the generation: light `forward_to_judge` tasks (no
model, reserving `judge.cpus_per_actor`, at most two per host at once) hand each batch to a host and pass its
judged rows on. What this saves is the judge's start-up in every pass: a new process, its imports and
two model loads (~3-4 s a pass on the quickstart), which lie on the pass's critical path, since the judge can
begin only when it is up. The judgment itself is `Judge`'s, batch for batch, so it equals a per-pass judge's.
Not here: the judge's math (`rayalign.judge`), the generators (`rayalign.generator_pool`).
"""

from __future__ import annotations

import pandas as pd

from rayalign.config import Config
from rayalign.host_pool import TASKS_PER_HOST, HostPool, WeightsHost, host_options, size_host_threads


class JudgeHost(WeightsHost):
    """A Ray actor holding one `Judge` (policy `tag`, pi_SFT `sft_path`) for the run."""

    def __init__(self, policy_path: str, sft_path: str, config: Config, tag: str):
        size_host_threads(config.judge.cpus_per_actor)
        self.args, self.tag = (policy_path, sft_path, config), tag
        self.judge = None if self.starts_released(config.judge.offload_between_passes) else self._build()

    def _build(self):
        from rayalign.judge import Judge

        return Judge(*self.args)

    def judge_batch(self, batch: pd.DataFrame, policy_path: str, tag: str) -> pd.DataFrame:
        self.hold(policy_path, tag)
        return self.judge(batch)

    def _load_state(self, state: dict) -> None:
        self.judge.policy.load_state_dict(state, strict=True)

    def _offload(self) -> None:
        from rayalign.devices import move_models

        move_models(self.judge.held_models(), "cpu")

    def _onload(self) -> None:
        from rayalign.devices import move_models

        if self.judge is None:  # restarted released: built now, from its first models (`starts_released`)
            self.judge = self._build()
        else:
            move_models(self.judge.held_models(), self.judge.device)


def forward_to_judge(batch: pd.DataFrame, hosts: list, policy_path: str, tag: str) -> pd.DataFrame:
    """A light Ray Data task (no model): the batch to one host, chosen by its first prompt id (any host judges a
    batch alike), the judged rows back. A task for the reason `rayalign.generator_pool.take_block` is one."""
    import ray

    host = hosts[int(batch["prompt_id"].iloc[0]) % len(hosts)]
    return ray.get(host.judge_batch.remote(batch, policy_path, tag))


class JudgePool(HostPool):
    """The driver's side: starts the judges on the first pass, keeps their policy current, chains each pass."""

    kind = "judge"

    def __init__(self, config: Config, log=print):
        super().__init__(log, offloads=config.judge.offload_between_passes)
        self.config, self.sft_path = config, ""

    def chain(self, dataset, *, policy: str, tag: str, sft_path: str):
        """`dataset` (per-prompt rows with `texts`) judged with the weights of `policy` (`tag`: the driver's name of
        it, which the training stage's push carries) against `sft_path`, as `rayalign.judge.judge_dataset`."""
        import ray

        if self.hosts and sft_path != self.sft_path:
            raise ValueError(f"judge.persistent: the run's judges hold pi_SFT {self.sft_path}; a pass asked for "
                             f"{sft_path}")
        self.ensure(policy, tag, lambda: self._start(policy, tag, sft_path))
        j = self.config.judge
        return dataset.map_batches(
            forward_to_judge, fn_args=(self.hosts, policy, tag), batch_format="pandas", batch_size=j.batch_size,
            num_cpus=j.cpus_per_actor, compute=ray.data.TaskPoolStrategy(size=TASKS_PER_HOST * len(self.hosts)))

    def _start(self, policy: str, tag: str, sft_path: str) -> list:
        import ray

        j, self.sft_path = self.config.judge, sft_path
        host = ray.remote(JudgeHost).options(**host_options(j.gpus_per_actor, j.resources, j.cpus_per_actor))
        return [host.remote(policy, sft_path, self.config, tag) for _ in range(j.num_actors)]
