"""Generator actors that live for a whole `rayalign run` (`generate.persistent=true`), updated in memory.

Each `SamplerHost` actor builds its sampler (a vLLM engine or the HF model) once, from the first model a pass
asks for, and takes each new policy's weights in memory (`rayalign.host_pool`: the push after each training
stage, the repair of a stale host from files; `update_weights` of `rayalign.samplers` loads them into the
running engine in place). Nothing is rebuilt.

Ray Data still carries the pass, but it no longer paces the sampling. When a pass's dataset is built, each host is
handed its share of the prompt blocks at once (`begin_pass`) and samples them in order on a thread of its own, at
most `RUN_AHEAD_BLOCKS` blocks beyond what the pass has taken. The dataset's light `take_block` tasks (holding no
model, at most `TASKS_PER_HOST` per host at once) take each block's rows from its host as it finishes, and the rows
flow on to the Judge actors. So a host never idles for Ray Data's scheduling (a take can wait for a worker process
to start, ~1 s here, where a sampling block takes ~0.3 s), and holds at most that many finished blocks in memory.
The takes, not the hosts, reserve `generate.cpus_per_actor` (a host with `generate.gpus_per_actor` keeps its GPU
share for the run: `rayalign.host_pool`). Samples are seeded per prompt id, so which host serves a block does not
change them.
Not here: sampling (`rayalign.samplers`), the judge (chained by `rayalign.stages.judged_pass`).
"""

from __future__ import annotations

import threading

import pandas as pd

from rayalign.config import GenerateConfig
from rayalign.host_pool import TASKS_PER_HOST, HostPool, WeightsHost, host_options, size_host_threads
from rayalign.models import LoadOptions

# How far a host samples ahead of the pass's takes: enough to cover a worker's start-up (~1 s here, 3-4 blocks),
# few enough that finished blocks waiting for a slow judge do not pile up in its memory.
RUN_AHEAD_BLOCKS = 4
# Threads of a host actor: the feed's own thread is extra; these serve begin_pass, take (the takes in
# flight; more if a pass is abandoned) and the weight calls.
HOST_CONCURRENCY = 4


class PassFeed:
    """One pass's blocks on one host, sampled in order by a thread, at most `ahead` blocks beyond those taken.

    `take(k)` waits for block k's rows and hands them over once (a second take of k raises, not waits); a failed
    block's error is raised by every take that follows it. `cancel` stops the thread after the block it is
    sampling (a pass abandoned half-way)."""

    def __init__(self, pass_id: str, blocks: list[tuple[int, pd.DataFrame]], ahead: int, sample):
        self.pass_id, self.blocks, self.ahead, self.sample = pass_id, blocks, max(1, ahead), sample
        self.indices = {index for index, _ in blocks}
        self.done: dict[int, pd.DataFrame] = {}
        self.handed: set[int] = set()  # blocks taken; how many were is how far the thread may run ahead
        self.failed, self.cancelled = None, False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=f"feed-{pass_id}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for produced, (index, block) in enumerate(self.blocks):
            with self.changed:
                self.changed.wait_for(lambda n=produced: self.cancelled or n - len(self.handed) < self.ahead)
                if self.cancelled:
                    return
            try:
                rows = self.sample(block)
            except BaseException as exc:  # noqa: BLE001 - handed to the take that waits, raised there
                with self.changed:
                    self.failed = exc
                    self.changed.notify_all()
                return
            with self.changed:
                self.done[index] = rows
                self.changed.notify_all()

    def take(self, index: int) -> pd.DataFrame:
        if index not in self.indices:  # a block given to another host: waiting for it here would never end
            raise KeyError(f"block {index} is not one of pass {self.pass_id}'s blocks on this host")
        with self.changed:
            self.changed.wait_for(lambda: index in self.done or index in self.handed or self.failed is not None
                                  or self.cancelled)
            if index in self.handed:  # a retried take (Ray retries a task whose worker died): its rows are gone
                raise RuntimeError(f"block {index} of pass {self.pass_id} was handed over already; its take was "
                                   "retried after its first result was lost: run the pass again")
            if index not in self.done:
                if self.failed is not None:
                    raise self.failed
                raise RuntimeError(f"pass {self.pass_id} was cancelled before block {index} was sampled")
            self.handed.add(index)
            self.changed.notify_all()
            return self.done.pop(index)

    def cancel(self) -> None:
        with self.changed:
            self.cancelled = True
            self.changed.notify_all()
        self.thread.join()


class SamplerHost(WeightsHost):
    """A Ray actor (threaded: `HOST_CONCURRENCY`) holding one `rayalign.generate.Generator`, the tag of the
    weights it holds and the feed of the pass it serves."""

    def __init__(self, model_path: str, config: GenerateConfig, load: LoadOptions | None, tag: str):
        size_host_threads(config.cpus_per_actor)
        self.args, self.tag, self.feed = (model_path, config, load), tag, None
        self.generator = None if self.starts_released(config.offload_between_passes) else self._build()

    def _build(self):
        from rayalign.generate import Generator

        model_path, config, load = self.args
        return Generator(model_path, config, load=load)

    def begin_pass(self, pass_id: str, blocks: list[tuple[int, pd.DataFrame]], ahead: int, model: str,
                   tag: str) -> None:
        """Start sampling `blocks` ((index in the pass, prompts) in order) for the pass `pass_id`, with the weights
        of `tag` (`model`'s files)."""
        self._end_pass()
        self.hold(model, tag)
        self.feed = PassFeed(pass_id, blocks, ahead, self.generator)

    def take(self, pass_id: str, index: int) -> pd.DataFrame:
        feed = self.feed
        if feed is None or feed.pass_id != pass_id:
            raise RuntimeError(f"block {index} of pass {pass_id} asked of a host serving "
                               f"{feed.pass_id if feed else 'no pass'}")
        return feed.take(index)

    def _load_state(self, state: dict) -> None:
        self._end_pass()  # the feed's thread must not sample while the weights change
        self.generator.sampler.update_weights(state)

    def _offload(self) -> None:
        self._end_pass()
        self.generator.sampler.offload()

    def _onload(self) -> None:
        if self.generator is None:  # restarted released: built now, from its first model (`starts_released`)
            self.generator = self._build()
        else:
            self.generator.sampler.onload()

    def _end_pass(self) -> None:
        if self.feed is not None:
            self.feed.cancel()
            self.feed = None


def take_block(batch: pd.DataFrame, hosts: list, pass_id: str) -> pd.DataFrame:
    """A light Ray Data task (no model): the rows of the pass's block `batch["block"]` from the host sampling it.

    A task, not an actor: Ray reuses an idle task worker, warm from the last pass, where an actor always starts
    a fresh process (~0.8 s of CPU importing Ray Data, here, in each pass's first second, taken from the
    sampling). It stays warm only while Ray keeps idle workers, which `rayalign.ray_session` sees to."""
    import ray

    index = int(batch["block"].iloc[0])
    return ray.get(hosts[index % len(hosts)].take.remote(pass_id, index))


def block_index(count: int):
    """A dataset of `count` one-row blocks, {"block": k} for k = 0..count-1 (none for an empty pass).

    Built by `from_items` in the driver: `from_pandas` would run a Ray task per block to read its schema, and
    that backlog makes the raylet start a worker process beside the sampling at each pass's start."""
    import ray

    # from_items refuses 0 blocks; with 1 and no items it gives an empty dataset, as from_pandas([]) did.
    return ray.data.from_items([{"block": k} for k in range(count)], override_num_blocks=max(1, count))


class GeneratorPool(HostPool):
    """The driver's side: starts the hosts on the first pass, keeps them current, builds each pass's dataset."""

    kind = "generator"

    def __init__(self, config: GenerateConfig, load: LoadOptions | None = None, log=print):
        super().__init__(log, offloads=config.offload_between_passes)
        self.config, self.load = config, load

    def dataset(self, prompts: pd.DataFrame, *, model: str, tag: str):
        """The Ray Data pipeline of one generation pass over `prompts` with the weights of `model` (`tag`: the
        driver's name of it, which the training stage's push carries), as `rayalign.generate.generation_dataset`
        gives; unlike that one, the hosts start sampling when it is built, not when it is consumed."""
        import uuid

        import ray

        from rayalign.generate import prompt_blocks

        self.ensure(model, tag, lambda: self._start(model, tag))
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        c, count = self.config, len(self.hosts)
        blocks, pass_id = prompt_blocks(prompts, c.batch_size), uuid.uuid4().hex
        # The sampling starts now, not when Ray Data schedules it (the module docstring says why).
        ray.get([host.begin_pass.remote(pass_id, [(k, b) for k, b in enumerate(blocks) if k % count == h],
                                        RUN_AHEAD_BLOCKS, model, tag) for h, host in enumerate(self.hosts)])
        takes = max(1, min(TASKS_PER_HOST * count, len(blocks)))  # no more than the blocks: Ray Data warns of it
        return block_index(len(blocks)).map_batches(
            take_block, fn_args=(self.hosts, pass_id), batch_format="pandas", batch_size=1,
            num_cpus=c.cpus_per_actor, compute=ray.data.TaskPoolStrategy(size=takes))

    def _start(self, model: str, tag: str) -> list:
        import ray

        c = self.config
        options = host_options(c.gpus_per_actor, c.resources, c.cpus_per_actor, max_concurrency=HOST_CONCURRENCY)
        host = ray.remote(SamplerHost).options(**options)
        return [host.remote(model, c, self.load, tag) for _ in range(c.num_actors)]
