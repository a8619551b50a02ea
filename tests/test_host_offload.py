"""Persistent hosts that free their device between passes (`generate/judge.offload_between_passes`).

First the host's state alone (`rayalign.host_pool.WeightsHost`, no Ray): a release offloads once; weights pushed
while released wait in host memory (the host reports their tag) and are loaded right after the device comes back,
at the next pass; a pass asking for other weights still loads its files. Then on local Ray, the loop's own pass
(`rayalign.stages.judged_pass`) with a generator pool and a judge pool that offload: each pass ends with every host
released; the new policy pushed during "training" waits, and the next pass samples and judges exactly as fresh
per-pass actors with the new weights' files; a host that Ray restarts comes up released (training may be
running) and builds its models only at the next pass, which it serves right; a host that cannot be released only
brings a warning (the pass's rows are complete). On this CPU the models stay where they are (the device is the
CPU); what moves them to a GPU and back is tested in tests/test_gpu.py.
"""

from __future__ import annotations

import pandas as pd
import pytest

from rayalign.config_loader import load_config
from rayalign.host_pool import WeightsHost
from tests.conftest import perturbed_copy


class RecordingHost(WeightsHost):
    """A host whose model is a log of what was done to it."""

    def __init__(self):
        self.tag, self.events = "a", []

    def _load_state(self, state: dict) -> None:
        self.events.append(("load", state["w"]))

    def _offload(self) -> None:
        self.events.append("offload")

    def _onload(self) -> None:
        self.events.append("onload")

    def load_weights_from(self, model_path: str, tag: str) -> None:
        self.events.append(("files", model_path))
        self.update_weights({"w": model_path}, tag)


def test_weights_pushed_to_a_released_host_wait_for_its_wake_up():
    host = RecordingHost()
    host.release()
    host.release()  # a second release (a pass with nothing to release) does nothing more
    assert host.events == ["offload"] and host.status() == {"tag": "a", "released": True, "pending": None}
    host.update_weights({"w": "b1"}, "b")
    host.update_weights({"w": "b2"}, "b")  # a later push replaces the waiting one
    assert host.events == ["offload"]  # nothing touched the device while released
    assert host.weights_tag() == "b" and host.status() == {"tag": "a", "released": True, "pending": "b"}
    host.hold("dir-b", "b")
    assert host.events == ["offload", "onload", ("load", "b2")]  # woken first, then the pushed weights
    assert host.status() == {"tag": "b", "released": False, "pending": None}
    host.hold("dir-b", "b")  # every batch of a pass calls hold: nothing more once awake
    assert len(host.events) == 3


def test_a_released_host_asked_for_other_weights_wakes_drops_the_pushed_ones_and_loads_files():
    host = RecordingHost()
    host.release()
    host.update_weights({"w": "b"}, "b")
    host.hold("dir-c", "c")  # e.g. a resumed run's pass: the pushed weights are not the ones it needs
    assert host.events == ["offload", "onload", ("files", "dir-c"), ("load", "dir-c")]  # B dropped, not loaded
    assert host.status() == {"tag": "c", "released": False, "pending": None}


OVERRIDES = ["generate.num_samples=2", "generate.max_new_tokens=6", "generate.batch_size=2", "generate.seed=4",
             "judge.batch_size=2", "data.max_prompt_length=32", "data.max_completion_length=8"]
OFFLOADING = ["generate.persistent=true", "generate.offload_between_passes=true", "judge.persistent=true",
              "judge.offload_between_passes=true"]
COLUMNS = ["prompt_id", "token_ids", "chosen_index", "rejected_index", "policy_logps", "sft_logps"]


def _wait_for_status(host, status: dict, timeout: float = 120.0) -> None:
    import time

    import ray

    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            seen = ray.get(host.status.remote(), timeout=30)
            if seen == status:
                return
        except ray.exceptions.RayError:  # the old process dying, the new one starting
            pass
        time.sleep(0.1)
    raise AssertionError(f"the restarted host reports {seen}, not {status}")


def _wait_until_dead(host, timeout: float = 60.0) -> None:
    import time

    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(host.status.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError(f"the killed host still answers after {timeout} s")


def _sorted(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.sort_values("prompt_id").reset_index(drop=True)[COLUMNS]


@pytest.mark.slow
@pytest.mark.usefixtures("in_process_ray")
def test_offloading_pools_release_after_each_pass_and_serve_pushed_weights_at_the_next(tiny_model_dir, tmp_path):
    import ray

    from rayalign.generator_pool import GeneratorPool
    from rayalign.host_pool import push_target, push_weights
    from rayalign.judge_pool import JudgePool
    from rayalign.stages import judged_pass
    from rayalign.train import ensure_ray

    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    config, per_pass = load_config(None, [*OVERRIDES, *OFFLOADING]), load_config(None, OVERRIDES)
    model_a, b_dir = str(tiny_model_dir), tmp_path / "b"
    state_b = perturbed_copy(model_a, b_dir)
    prompts = pd.DataFrame({"prompt_id": range(4), "prompt": [f"Review {i}: the film" for i in range(4)]})
    logs: list[str] = []
    generators, judges = GeneratorPool(config.generate, log=logs.append), JudgePool(config, log=logs.append)
    hosts = lambda: ray.get([h.status.remote() for h in generators.hosts + judges.hosts])  # noqa: E731

    first = judged_pass(config, prompts, model=model_a, sft_path=model_a, pool=generators, judges=judges, tag="a")
    assert hosts() == [{"tag": "a", "released": True, "pending": None}] * 2
    push_weights(push_target("b", generators, judges), state_b)  # as training's rank 0 does, the hosts released
    assert hosts() == [{"tag": "a", "released": True, "pending": "b"}] * 2
    pushed = judged_pass(config, prompts, model=str(b_dir), sft_path=model_a, pool=generators, judges=judges, tag="b")
    assert hosts() == [{"tag": "b", "released": True, "pending": None}] * 2
    assert generators.loaded_from_files == judges.loaded_from_files == 0  # the pushed weights served the pass
    fresh = judged_pass(per_pass, prompts, model=str(b_dir), sft_path=model_a)
    pd.testing.assert_frame_equal(_sorted(pushed), _sorted(fresh), check_exact=False, rtol=1e-6, atol=1e-6)
    assert _sorted(pushed)["token_ids"].tolist() != _sorted(first)["token_ids"].tolist()
    ray.kill(judges.hosts[0], no_restart=False)  # Ray restarts it: released, as training may run, its models unbuilt
    _wait_for_status(judges.hosts[0], {"tag": "a", "released": True, "pending": None})
    again = judged_pass(config, prompts, model=str(b_dir), sft_path=model_a, pool=generators, judges=judges, tag="b")
    pd.testing.assert_frame_equal(_sorted(again), _sorted(fresh), check_exact=False, rtol=1e-6, atol=1e-6)
    assert judges.loaded_from_files == 1  # built from its first model (A) at the wake, then B's files loaded
    ray.kill(generators.hosts[0], no_restart=True)  # a host gone: releasing after a complete pass only warns
    _wait_until_dead(generators.hosts[0])  # the kill is asynchronous: a call that beat it would still be served
    generators.release()
    assert any("generator: warning: could not release" in line for line in logs), logs
    generators.shutdown()
    judges.shutdown()
