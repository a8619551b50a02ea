"""Judges that live for the run (`rayalign.judge_pool`, `judge.persistent=true`) on local Ray.

One pool of two judge hosts judges the same sampled rows three times: with the policy A (the tiny model) against
pi_SFT S; after the weights B are pushed through the object store (as the training stage's rank 0 does): the
judgment equals a fresh per-pass judge's with B's files; then asking for A again: the hosts load A's files and
give the first judgment; a pass the driver did not check (as if the hosts restarted after its check) is judged
with B, which each host loads itself. Two hosts were started in all; a pass asking for another pi_SFT is refused.
"""

from __future__ import annotations

import pandas as pd
import pytest

from rayalign.config_loader import load_config
from tests.conftest import perturbed_copy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("in_process_ray")]

OVERRIDES = ["generate.num_samples=3", "generate.max_new_tokens=6", "generate.batch_size=2", "judge.batch_size=2",
             "judge.num_actors=2", "data.max_prompt_length=32", "data.max_completion_length=8"]
JUDGMENT = ["chosen_index", "rejected_index", "margin", "dropped", "judge_rewards", "policy_logps", "sft_logps"]


def _judgment(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("prompt_id").reset_index(drop=True)[["prompt_id", *JUDGMENT]]


def _assert_same(left: pd.DataFrame, right: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(_judgment(left), _judgment(right), check_exact=False, rtol=1e-6, atol=1e-6)


def test_pushed_weights_judge_as_a_fresh_judge_and_files_reload_in_place(tiny_model_dir, tmp_path):
    import ray

    from rayalign.generate import generation_dataset
    from rayalign.host_pool import push_target, push_weights
    from rayalign.judge import judge_dataset
    from rayalign.judge_pool import JudgePool
    from rayalign.tiny import make_tiny_model
    from rayalign.train import ensure_ray

    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = load_config(None, OVERRIDES)
    one_judge = load_config(None, [*OVERRIDES, "judge.num_actors=1"])  # a fresh per-pass judge, batch for batch
    sft = str(make_tiny_model(tmp_path / "sft", seed=1))  # the same tokenizer, other weights
    model_a = str(tiny_model_dir)
    prompts = pd.DataFrame({"prompt_id": range(4), "prompt": [f"Review {i}: the film" for i in range(4)]})
    samples = generation_dataset(prompts, model_a, config.generate).to_pandas()
    b_dir = tmp_path / "b"
    state_b = perturbed_copy(model_a, b_dir)

    def judged(pool_or_none, policy: str, tag: str) -> pd.DataFrame:
        rows = ray.data.from_pandas([samples.iloc[i:i + 2] for i in range(0, len(samples), 2)])
        if pool_or_none is None:
            return judge_dataset(rows, policy_path=policy, sft_path=sft, config=one_judge).to_pandas()
        return pool_or_none.chain(rows, policy=policy, tag=tag, sft_path=sft).to_pandas()

    logs: list[str] = []
    pool = JudgePool(config, log=logs.append)
    first = judged(pool, model_a, "a")
    _assert_same(first, judged(None, model_a, "a"))
    push_weights(push_target("b", pool), state_b)
    pushed = judged(pool, str(b_dir), "b")
    assert not any("loading its weights" in line for line in logs)  # the pushed weights were used
    _assert_same(pushed, judged(None, str(b_dir), "b"))
    assert not _judgment(pushed)["policy_logps"].equals(_judgment(first)["policy_logps"])
    _assert_same(judged(pool, model_a, "a"), first)
    assert any("judge: 2 engine(s) hold b, not a: loading its weights" in line for line in logs)
    assert pool.engines_started == 2 and pool.loaded_from_files == 2
    pool.ensure = lambda *args: None  # as if both were restarted after the driver's check: each host loads B itself
    _assert_same(judged(pool, str(b_dir), "b"), pushed)
    with pytest.raises(ValueError, match="hold pi_SFT"):
        pool.chain(ray.data.from_pandas(samples), policy=model_a, tag="a", sft_path=str(b_dir))
    pool.shutdown()
