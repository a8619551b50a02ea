"""`rayalign train` on the data users bring: a local UltraFeedback-like `DatasetDict` (data.split=train_prefs,
data.eval_split=test_prefs) and a TRL implicit-prompt conversational .jsonl, on a chat model: the tiny model
with a ChatML template (`make-tiny-model --chat-template chatml`), so conversations are rendered by it.

One Ray Train fit each, 1 worker, 2 steps, in-process through `rayalign.cli.main` (what the command runs),
so both share one local Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_data_splits import assistant, make_ultrafeedback, user

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("in_process_ray")]


def implicit_conversations(n: int) -> list[dict]:
    """TRL implicit-prompt conversational rows: two turns of shared context, then the two replies."""
    rows = []
    for i in range(n):
        shared = [user(f"I have {i} apples."), assistant("Nice."), user(f"How many after eating {i % 3}?")]
        rows.append({"chosen": [*shared, assistant(f"You have {i - i % 3} left.")],
                     "rejected": [*shared, assistant("I do not know.")]})
    return rows


def final_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "final_metrics.json").read_text())


def test_train_on_an_ultrafeedback_dataset_dict_and_on_implicit_conversations(chat_model_dir, tmp_path, capsys):
    from rayalign.cli import main
    from rayalign.models import load_tokenizer

    common = [f"model.policy={chat_model_dir}", "train.global_batch_size=4", "train.max_steps=2",
              "data.max_prompt_length=32", "data.max_completion_length=16", "ref.cache=false"]
    uf, run = make_ultrafeedback(tmp_path / "uf", train=8, test=4), tmp_path / "uf-run"
    assert main(["train", *common, f"data.train_file={uf}", "data.split=train_prefs", "data.eval_split=test_prefs",
                 f"run.dir={run}"]) == 0
    assert "pairs: train 8, eval 4; 0 dropped" in capsys.readouterr().out
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(s["loss"] > 0 for s in steps)
    assert 0.0 <= final_metrics(run)["eval/rewards/accuracies"] <= 1.0

    data, run = tmp_path / "implicit.jsonl", tmp_path / "implicit-run"
    data.write_text("".join(json.dumps(r) + "\n" for r in implicit_conversations(10)))
    assert main(["train", *common, f"data.train_file={data}", "data.eval_fraction=0.2", f"run.dir={run}"]) == 0
    assert "pairs: train 8, eval 2; 0 dropped" in capsys.readouterr().out
    assert (run / "final" / "config.json").exists() and "eval/loss" in final_metrics(run)
    prepared = __import__("pandas").read_parquet(run / "prepared" / "train.parquet")
    assert len(prepared) == 8
    # rendered by the model's template: the prompt ends in its generation prompt, a reply in its end of turn
    tokenizer = load_tokenizer(chat_model_dir)
    prompt, chosen = (tokenizer.decode(prepared[c].iloc[0]) for c in ("prompt_ids", "chosen_ids"))
    # (data.max_prompt_length=32 keeps the prompt's end, as TRL does)
    assert "<|im_end|>\n<|im_start|>user\n" in prompt and prompt.endswith("<|im_start|>assistant\n"), prompt
    assert chosen.endswith("<|im_end|>"), chosen
