"""The reward models a `Judge` actor holds: the judging one (judge.type=reward_model) and the evaluation one
(eval.reward_model), loaded once per actor (one copy when both name the same model).

- `judge_scores(batch)`: r(x, y) of every sample, (P, K): the judge ranks by these instead of SPA's
  implicit reward (`rayalign.core.reward_model.reward_model_judgment`), and they fill `judge_rewards`.
- `eval_scores(batch)`: the evaluation model's r(x, y) per sample, as the `rm_rewards` list column, for the
  held-out evaluation prompts only (ids >= `data.prompts.EVAL_PROMPT_ID`); the loop's training prompts get NaN
  (scoring them would cost a forward pass per sample that no metric reads; the column never reaches
  judged.parquet or samples.parquet).
The metrics from `rm_rewards` (win rates, mean reward) are `rayalign.evaluate`'s; scoring itself is
`rayalign.reward_model`. No Ray here: this runs inside the Judge actor.
"""

from __future__ import annotations

import pandas as pd
import torch

from rayalign.config import Config

EVAL_REWARDS = "rm_rewards"  # per-sample rewards of eval.reward_model in the evaluation rows


def _load(name: str, key: str, config: Config):
    from rayalign.devices import inference_dtype, stage_device
    from rayalign.reward_model import RewardModel, reward_load_options
    from rayalign.storage import materialize

    return RewardModel(materialize(name), key=key, load=reward_load_options(config.model),
                       dtype=inference_dtype(config.judge.dtype, config.judge.gpus_per_actor),
                       device=stage_device(config.judge.gpus_per_actor, "judge"),
                       max_length=config.data.max_prompt_length + config.data.max_completion_length,
                       batch_size=config.judge.batch_size)


class RewardModels:
    """judge.reward_model and eval.reward_model, loaded (None where not configured)."""

    def __init__(self, config: Config):
        judge_name = config.judge.reward_model if config.judge.type == "reward_model" else None
        eval_name = config.eval.reward_model
        self.judge = _load(judge_name, "judge.reward_model", config) if judge_name else None
        self.eval = (self.judge if eval_name and eval_name == judge_name
                     else _load(eval_name, "eval.reward_model", config) if eval_name else None)

    @staticmethod
    def _groups(batch: pd.DataFrame) -> tuple[list, list[list[str]]]:
        from rayalign.templating import prompt_values

        # a message-list prompt as messages: the reward model renders it with its own chat template
        return prompt_values(batch), [list(texts) for texts in batch["texts"]]

    def judge_scores(self, batch: pd.DataFrame) -> torch.Tensor:
        """judge.reward_model's reward of each prompt's samples, (P, K) float32."""
        return self.judge.score(*self._groups(batch))

    def eval_scores(self, batch: pd.DataFrame, judge_scores: torch.Tensor | None) -> list[list[float]]:
        """eval.reward_model's rewards per row (NaN outside the evaluation prompts); reuses `judge_scores`
        when the judge is the same model."""
        from rayalign.data.prompts import EVAL_PROMPT_ID

        prompts, texts = self._groups(batch)
        rows = [i for i, prompt_id in enumerate(batch["prompt_id"]) if int(prompt_id) >= EVAL_PROMPT_ID]
        out = [[float("nan")] * len(t) for t in texts]
        if self.eval is self.judge and judge_scores is not None:
            scores = judge_scores[rows]
        else:
            scores = self.eval.score([prompts[i] for i in rows], [texts[i] for i in rows])
        for row, values in zip(rows, scores.tolist()):
            out[row] = values
        return out
