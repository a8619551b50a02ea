"""`rayalign run` as a user with their own chat model and data runs it (issue 13's end-to-end check).

`loop.task=none`: the policy is a chat model (the tiny model with a ChatML template), the seed pairs are the
`train_prefs` split of a local UltraFeedback-like `DatasetDict`, the loop's prompts are message lists from
its `train_gen` split, a reward model (fitted on the sentiment task, with its own tokenizer and template)
judges the samples (`judge.type=reward_model`) and evaluates every model (`eval.reward_model`), and the
policy trains LoRA adapters, merged into each iteration's `final/`. One iteration, tiny sizes: this checks
that the pieces work together, not that the model learns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.test_data_splits import assistant, ultrafeedback_rows, user

pytestmark = pytest.mark.slow


def _dataset_dict(path) -> str:
    import datasets

    gen = [{"prompt": f"Review {i}", "messages": [user(f"Write one sentence about movie {i}."),
                                                  assistant("A reply the loop drops.")]} for i in range(10)]
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(ultrafeedback_rows(8)),
                          "train_gen": datasets.Dataset.from_list(gen)}).save_to_disk(path)
    return str(path)


def test_run_with_a_chat_model_dataset_splits_a_reward_model_and_lora(chat_model_dir, reward_model_dir, tmp_path):
    import pandas as pd

    data, run_dir = _dataset_dict(tmp_path / "uf"), tmp_path / "run"
    overrides = [
        "loop.task=none", f"model.policy={chat_model_dir}", f"data.train_file={data}", "data.split=train_prefs",
        f"data.prompts_file={data}", "data.prompts_split=train_gen", "judge.type=reward_model",
        f"judge.reward_model={reward_model_dir}", f"eval.reward_model={reward_model_dir}", "model.lora=true",
        "model.lora_rank=4", "optim.lr=1e-3", "loop.iterations=1", "loop.prompts_per_iteration=8", "eval.prompts=2",
        "loop.seed_epochs=1", "generate.num_samples=2", "generate.max_new_tokens=12", "train.global_batch_size=4",
        "data.max_prompt_length=48", "data.max_completion_length=16", f"run.dir={run_dir}"]
    result = subprocess.run([sys.executable, "-m", "rayalign.cli", "run", "configs/quickstart.yaml", *overrides],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1]
    for record in records:  # the reward model's evaluation, on a task without a gold reward
        assert 0.0 <= record["rm/win_rate_vs_sft"] <= 1.0 and 0.0 <= record["rm/win_rate_vs_prev"] <= 1.0
        assert isinstance(record["rm/reward_mean"], float) and "gold_reward_mean" not in record
    assert "rm/win_rate_vs_sft" in (run_dir / "report.md").read_text()

    # the prompts came from train_gen as messages, and were rendered with the policy's ChatML template
    judged = pd.read_parquet(run_dir / "iter-1" / "judged.parquet")
    assert len(judged) > 0 and all(p.startswith("<|im_start|>user\nWrite one sentence") for p in judged["prompt"])
    assert all(p.endswith("<|im_start|>assistant\n") for p in judged["prompt"])
    # the judge ranked by the reward model: the chosen sample has the larger score
    assert all(r[c] > r[w] for r, c, w in zip(judged["judge_rewards"], judged["chosen_index"],
                                                judged["rejected_index"]))

    # LoRA: each final/ is a merged plain model (no adapter files), and it moved away from the base
    from safetensors.torch import load_file

    for it in (0, 1):
        final = run_dir / f"iter-{it}" / "train" / "final"
        assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists()
    base, trained = load_file(str(chat_model_dir / "model.safetensors")), load_file(
        str(run_dir / "iter-1" / "train" / "final" / "model.safetensors"))
    assert base.keys() == trained.keys()
    assert any(not (base[k] == trained[k]).all() for k in base)
