"""Generator actors that live for a whole `rayalign run` (`generate.persistent=true`), updated in memory.

Each `SamplerHost` actor builds its sampler (a vLLM engine or the HF model) once, from the first model a pass
asks for. After each training stage it receives the new policy's weights in memory: the stage's rank 0 pushes
the consolidated state it has just written to final/ through Ray's object store (`push_weights`, called by
`rayalign.train_loop`), tagged with the driver's path of that final/; the host loads it into the running
engine in place (`update_weights` of `rayalign.samplers`). Before every pass the driver checks that each host
holds the weights of the model the pass is for; one that does not (a stage skipped on a resume, a failed push)
loads them from that model's files, still into the same engine. Nothing is rebuilt.

Ray Data still drives the pass: light `Forwarder` actors (one per host, started per pass, holding no model)
hand each block of prompts to a host and return its rows, which flow on to the Judge actors. The forwarders,
not the hosts, reserve `generate.cpus_per_actor`, so an idle host keeps its memory but no CPU while training
runs; GPUs cannot be lent, so a host with `generate.gpus_per_actor` keeps its GPU share for the run (the other
stages must fit beside it). Samples are seeded per prompt id, so which host serves a block does not change them.
Not here: sampling (`rayalign.samplers`), the judge (chained by `rayalign.stages.judged_pass`).
"""

from __future__ import annotations

import pandas as pd

from rayalign.config import GenerateConfig
from rayalign.models import LoadOptions


class SamplerHost:
    """A Ray actor holding one `rayalign.generate.Generator` and the tag of the weights it holds."""

    def __init__(self, model_path: str, config: GenerateConfig, load: LoadOptions | None, tag: str):
        import torch

        from rayalign.generate import Generator

        # Ray sizes a worker's thread pool from its CPU reservation, which is 0 here (the pass's forwarders hold it).
        torch.set_num_threads(max(1, int(config.cpus_per_actor)))
        self.generator, self.tag = Generator(model_path, config, load=load), tag

    def generate(self, batch: pd.DataFrame) -> pd.DataFrame:
        return self.generator(batch)

    def weights_tag(self) -> str:
        return self.tag

    def update_weights(self, state: dict, tag: str) -> None:
        self.generator.sampler.update_weights(state)
        self.tag = tag

    def load_weights_from(self, model_path: str, tag: str) -> None:
        """The weights of the model at `model_path` (a directory or storage location), into the running sampler."""
        from rayalign.storage import materialize

        self.update_weights(read_weights(materialize(model_path)), tag)


def read_weights(directory: str) -> dict:
    """Every tensor of an HF model directory's safetensors files (one file or shards)."""
    from pathlib import Path

    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors weights to load into the generator")
    return {name: tensor for file in files for name, tensor in load_file(file).items()}


class Forwarder:
    """A light Ray Data actor (no model): each block's prompts to one host (chosen by the block's first prompt id),
    the host's rows back. An actor pool rather than tasks: Ray Data keeps several blocks in flight per actor, so
    the host never waits for the next task to be scheduled (tasks cost ~0.4 s a block here)."""

    def __init__(self, hosts: list, batch_size: int):
        self.hosts, self.batch_size = hosts, batch_size

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import ray

        host = self.hosts[(int(batch["prompt_id"].iloc[0]) // self.batch_size) % len(self.hosts)]
        return ray.get(host.generate.remote(batch))


def push_weights(target: dict, state: dict) -> None:
    """The training stage's end (rank 0): `state` (the consolidated weights just saved) to every host, once
    through the object store; `target` is what `GeneratorPool.push_target` gave the stage. A failure only
    warns: the stage's output is on disk, and the next pass loads it from there (`GeneratorPool`)."""
    import sys

    import ray

    try:
        ref = ray.put({name: tensor.detach().cpu() for name, tensor in state.items()})
        ray.get([host.update_weights.remote(ref, target["tag"]) for host in target["hosts"]])
    except Exception as exc:  # noqa: BLE001 - any failure leaves the engines stale, which the driver repairs
        print(f"rayalign train: warning: could not push the weights to the generators ({exc}); the next "
              "sampling pass loads them from final/", file=sys.stderr)


class GeneratorPool:
    """The driver's side: starts the hosts on the first pass, keeps them current, builds each pass's dataset."""

    def __init__(self, config: GenerateConfig, load: LoadOptions | None = None, log=print):
        self.config, self.load, self.log = config, load, log
        self.hosts: list = []
        self.engines_started = 0
        self.loaded_from_files = 0

    def dataset(self, prompts: pd.DataFrame, *, model: str, tag: str):
        """The lazy Ray Data pipeline of one generation pass over `prompts` with the weights of `model` (`tag`: the
        driver's name of it, which the training stage's push carries), as `rayalign.generate.generation_dataset`."""
        import ray

        from rayalign.generate import prompt_blocks

        self._ensure(model, tag)
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        c = self.config
        return ray.data.from_pandas(prompt_blocks(prompts, c.batch_size)).map_batches(
            Forwarder, fn_constructor_args=(self.hosts, c.batch_size), batch_format="pandas",
            batch_size=c.batch_size, num_cpus=c.cpus_per_actor,
            compute=ray.data.ActorPoolStrategy(size=len(self.hosts)))

    def push_target(self, tag: str) -> dict | None:
        """What the training stage that writes `tag` (its final/ path) needs to push its weights here."""
        return {"hosts": list(self.hosts), "tag": tag} if self.hosts else None

    def _ensure(self, model: str, tag: str) -> None:
        import ray

        if not self.hosts:
            self._start(model, tag)
            return
        tags = ray.get([host.weights_tag.remote() for host in self.hosts])
        stale = [host for host, held in zip(self.hosts, tags, strict=True) if held != tag]
        if stale:  # e.g. a resumed run whose training stage was found done: nothing was pushed
            self.log(f"generator: {len(stale)} engine(s) hold {tags[self.hosts.index(stale[0])]}, not {tag}: "
                     "loading its weights from its files into the running engines")
            ray.get([host.load_weights_from.remote(model, tag) for host in stale])
            self.loaded_from_files += len(stale)

    def _start(self, model: str, tag: str) -> None:
        import ray

        from rayalign.devices import actor_resources

        c = self.config
        # num_cpus=0: the pass's forwarders reserve the CPUs (see the module docstring).
        options = {"num_cpus": 0, **actor_resources(c.gpus_per_actor, c.resources)}
        host = ray.remote(SamplerHost).options(**options)
        self.hosts = [host.remote(model, c, self.load, tag) for _ in range(c.num_actors)]
        ray.get([h.weights_tag.remote() for h in self.hosts])  # constructed (a failure surfaces here)
        self.engines_started += len(self.hosts)
        self.log(f"generator: {len(self.hosts)} {c.backend} engine(s) started from {model}; they stay for the run")

    def shutdown(self) -> None:
        import ray

        for host in self.hosts:
            ray.kill(host)
        self.hosts = []
