"""Generators that live for the run (`rayalign.generator_pool`, `generate.persistent=true`) on local Ray.

One pool of two hosts serves three passes of the same prompts (after a pass that was built and never read,
whose sampling the next pass cancels): with the tiny model A; after the new weights B are pushed through the
object store (as the training stage's rank 0 does, `push_weights`): the samples equal a fresh one-actor per-pass
generator's with B's files (blocks alternate between the hosts; seeds are per prompt); then a pass asking for A
again: the hosts load A's files into their running samplers and give the first pass's samples. Two engines were
started in all. HF backend (vLLM's in-place update is tested in test_vllm_backend.py); the hosts' pass feed
alone is tested in test_pass_feed.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from rayalign.config import GenerateConfig
from tests.conftest import perturbed_copy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("in_process_ray")]

CONFIG = GenerateConfig(num_samples=2, max_new_tokens=6, batch_size=2, seed=4, temperature=1.0)
TWO_HOSTS = dataclasses.replace(CONFIG, num_actors=2)
PROMPTS = ["I think the movie", "Honestly, this book felt", "The food was", "Our trip"]


def _rows(dataset) -> list:
    frame = dataset.to_pandas().sort_values("prompt_id")
    return [(int(r.prompt_id), [list(t) for t in r.token_ids]) for r in frame.itertuples()]


def _wait_until_it_holds(host, tag: str, timeout: float = 120.0) -> None:
    import time

    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ray.get(host.weights_tag.remote(), timeout=30) == tag:
                return
        except ray.exceptions.RayError:  # the old process dying, the new one starting
            pass
        time.sleep(0.1)
    raise AssertionError(f"the host was not restarted holding {tag} within {timeout} s")


def test_pushed_weights_sample_as_a_fresh_generator_and_files_reload_in_place(tiny_model_dir, tmp_path):
    import pandas as pd
    import ray

    from rayalign.generate import generation_dataset
    from rayalign.generator_pool import GeneratorPool
    from rayalign.host_pool import push_target, push_weights
    from rayalign.train import ensure_ray

    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    prompts = pd.DataFrame({"prompt_id": range(len(PROMPTS)), "prompt": PROMPTS})
    b_dir = tmp_path / "b"
    state_b = perturbed_copy(str(tiny_model_dir), b_dir)

    logs: list[str] = []
    pool = GeneratorPool(TWO_HOSTS, log=logs.append)
    pool.dataset(prompts, model=str(tiny_model_dir), tag="a")  # abandoned: its sampling is cancelled below
    first = _rows(pool.dataset(prompts, model=str(tiny_model_dir), tag="a"))
    push_weights(push_target("b", pool), state_b)
    pushed = _rows(pool.dataset(prompts, model=str(b_dir), tag="b"))
    assert not any("loading its weights" in line for line in logs)  # the pushed weights were used
    fresh = _rows(generation_dataset(prompts, str(b_dir), CONFIG))
    assert pushed == fresh and pushed != first
    ray.kill(pool.hosts[0], no_restart=False)  # as Ray's memory monitor would: Ray restarts it from A's files
    _wait_until_it_holds(pool.hosts[0], "a")  # the kill is asynchronous; `hold` covers the race in a real run
    assert _rows(pool.dataset(prompts, model=str(b_dir), tag="b")) == fresh
    assert any("1 engine(s) hold a, not b: loading its weights" in line for line in logs)
    again = _rows(pool.dataset(prompts, model=str(tiny_model_dir), tag="a"))
    assert again == first
    assert any("2 engine(s) hold b, not a: loading its weights" in line for line in logs)
    assert pool.engines_started == 2 and pool.loaded_from_files == 3
    pool.ensure = lambda *args: None  # as if both were restarted after the driver's check: each host loads B itself
    assert _rows(pool.dataset(prompts, model=str(b_dir), tag="b")) == fresh
    pool.shutdown()


def test_a_pass_index_has_one_block_per_prompt_block_and_none_for_an_empty_pass():
    """The pool's pass index (built in the driver, no Ray task): blocks 0..n-1 one per block, in order; an empty
    pass gives an empty dataset, as the per-pass path's `from_pandas([])` does, not an error."""
    from rayalign.generator_pool import block_index
    from rayalign.train import ensure_ray

    ensure_ray()
    index = block_index(3)
    assert index.num_blocks() == 3
    assert [row["block"] for row in index.take_all()] == [0, 1, 2]
    assert block_index(0).count() == 0
