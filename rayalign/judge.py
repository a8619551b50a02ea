"""The judging stage (Ray Data): SPA direct preference judgment of each prompt's own samples.

A `Judge` actor holds the current policy pi_{i-1} and the initial SFT model. For every sample it computes
both sequence log-probs exactly (a forward pass each, on the same tokenization the trainer uses) and the
implicit reward r = beta * (log pi_{i-1}(y|x) - log pi_SFT(y|x)); the prompt's chosen sample is the argmax,
the rejected one the argmin (ALGORITHMS.md §5). Pairs whose completions are empty or identical, or whose
rewards tie exactly, are dropped and counted. The output keeps the judgment's margin and confidence.

The pure math is `rayalign.core.spa`; this module only moves data through the models.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from rayalign.config import Config

DROP_REASONS = ("empty", "identical", "tie")
PASSTHROUGH = ("texts", "token_ids", "logprobs", "finish_reasons")


class Judge:
    """Ray Data callable class: per-prompt rows with their sample texts -> one judged pair per prompt."""

    def __init__(self, policy_path: str, sft_path: str, config: Config):
        from rayalign.models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(policy_path)
        self.policy = load_model(policy_path, dtype=config.model.dtype)
        self.sft = load_model(sft_path, dtype=config.model.dtype)
        self.config = config

    def _logps(self, model, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
        from rayalign.step import completion_logps

        return completion_logps(model, prompts, completions, pad_token_id=self.tokenizer.pad_token_id)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from rayalign.batching import encode_completion
        from rayalign.core.spa import implicit_rewards, judge_confidence, judge_pairs

        data = self.config.data
        prompt_ids, completion_ids = [], []
        for prompt, texts in zip(batch["prompt"], batch["texts"]):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"][-data.max_prompt_length:]
            for text in texts:
                prompt_ids.append(ids)
                completion_ids.append(encode_completion(self.tokenizer, text, data.max_completion_length)[0])
        policy = self._logps(self.policy, prompt_ids, completion_ids)
        sft = self._logps(self.sft, prompt_ids, completion_ids)
        shape = (len(batch), len(batch["texts"].iloc[0]))  # (prompts, samples per prompt)
        policy, sft = policy.view(shape), sft.view(shape)
        rewards = implicit_rewards(policy, sft, beta=self.config.judge.beta)
        chosen, rejected, margin = judge_pairs(rewards)[:3]
        confidence = judge_confidence(margin)
        out = pd.DataFrame([self._row(batch, i, int(chosen[i]), int(rejected[i]), float(margin[i]),
                                      float(confidence[i]), rewards[i], policy[i], sft[i])
                            for i in range(len(batch))])
        for column in PASSTHROUGH:  # the generation columns, so one pipeline yields both artifacts
            if column in batch:
                out[column] = list(batch[column])
        return out

    @staticmethod
    def _row(batch, i, chosen, rejected, margin, confidence, rewards, policy, sft) -> dict:
        texts = list(batch["texts"].iloc[i])
        if not texts[chosen].strip() or not texts[rejected].strip():
            dropped = "empty"
        elif texts[chosen] == texts[rejected]:
            dropped = "identical"
        elif margin == 0.0:
            dropped = "tie"
        else:
            dropped = ""
        return {"prompt_id": int(batch["prompt_id"].iloc[i]), "prompt": batch["prompt"].iloc[i],
                "chosen": texts[chosen], "rejected": texts[rejected], "chosen_index": chosen,
                "rejected_index": rejected, "margin": margin, "confidence": confidence,
                # judge_* names: a bare "rewards" column would make the file read as K-sample data
                "judge_rewards": rewards.tolist(), "policy_logps": policy.tolist(), "sft_logps": sft.tolist(),
                "dropped": dropped}


def judge_dataset(dataset, *, policy_path: str, sft_path: str, config: Config):
    """Chain a `Judge` actor pool onto a per-prompt Ray Dataset with a `texts` column."""
    import ray

    resources = {"num_gpus": config.judge.gpus_per_actor} if config.judge.gpus_per_actor else {}
    return dataset.map_batches(
        Judge, fn_constructor_args=(policy_path, sft_path, config), batch_format="pandas",
        batch_size=config.judge.batch_size, compute=ray.data.ActorPoolStrategy(size=config.judge.num_actors),
        num_cpus=config.judge.cpus_per_actor, **resources)


def write_judged(judged: pd.DataFrame, out_path: Path) -> dict:
    """Write the kept pairs (explicit format + judgment columns) atomically; return the counts."""
    from rayalign.data import write_rows_parquet

    judged = judged.sort_values("prompt_id").reset_index(drop=True)
    kept = judged[judged["dropped"] == ""].drop(columns=["dropped", *[c for c in PASSTHROUGH if c in judged]])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_rows_parquet(kept.to_dict("records"), out_path)
    counts = {"prompts": len(judged), "pairs": len(kept)}
    counts.update({f"dropped_{reason}": int((judged["dropped"] == reason).sum()) for reason in DROP_REASONS})
    return counts
