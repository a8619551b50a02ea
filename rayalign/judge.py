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
        from rayalign.models import LoadOptions, load_model, load_tokenizer
        from rayalign.storage import materialize

        policy_path, sft_path = materialize(policy_path), materialize(sft_path)  # run.storage: node-local copies
        load = LoadOptions.of(config.model)
        self.tokenizer = load_tokenizer(policy_path, load)
        self.policy = load_model(policy_path, load, dtype=config.model.dtype)
        self.sft = load_model(sft_path, load, dtype=config.model.dtype)
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
    if config.judge.resources:
        resources["resources"] = dict(config.judge.resources)
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


GROUP_DROP_REASONS = ("empty", "identical", "tied")


def sample_groups(samples: pd.DataFrame, judged: pd.DataFrame | None, *, rewards: str) -> tuple[list[dict], dict]:
    """An iteration's K samples per prompt as k_sample rows {id, prompt, completions, rewards}, and counts.

    `samples` is the generation artifact (one row per sample). `rewards="judge"` takes the judge's implicit
    rewards from `judged` (its kept prompts: the others tie or have an empty best/worst sample);
    `rewards="gold"` scores every sample with the sentiment task's gold reward. A group is dropped when a
    sample is empty (as the judge drops empty pairs), all K texts are the same, or all K rewards tie (the
    target is then uniform: no preference to learn).
    """
    from rayalign.tasks.sentiment import gold_reward

    judge_rewards = dict(zip(judged["prompt_id"], judged["judge_rewards"])) if rewards == "judge" else None
    rows, counts = [], {"prompts": 0, "groups": 0, **{f"dropped_{r}": 0 for r in GROUP_DROP_REASONS}}
    for prompt_id, group in samples.sort_values(["prompt_id", "sample_index"]).groupby("prompt_id", sort=True):
        counts["prompts"] += 1
        texts = list(group["text"])
        if judge_rewards is not None and prompt_id not in judge_rewards:
            continue  # the judge dropped it; counted as the judge counted it (judge_counts.json)
        values = [float(v) for v in judge_rewards[prompt_id]] if judge_rewards is not None else [
            gold_reward(t) for t in texts]
        reason = ("empty" if any(not t.strip() for t in texts) else "identical" if len(set(texts)) == 1
                  else "tied" if len(set(values)) == 1 else "")
        if reason:
            counts[f"dropped_{reason}"] += 1
            continue
        rows.append({"id": int(prompt_id), "prompt": group["prompt"].iloc[0], "completions": texts, "rewards": values})
    counts["groups"] = len(rows)
    return rows, counts


def best_worst_pairs(groups: list[dict]) -> list[dict]:
    """Explicit pairs from k_sample rows: the highest- vs the lowest-reward sample (first index on ties)."""
    pairs = []
    for g in groups:
        best = max(range(len(g["rewards"])), key=lambda i: g["rewards"][i])
        worst = min(range(len(g["rewards"])), key=lambda i: g["rewards"][i])
        pairs.append({"id": g["id"], "prompt": g["prompt"], "chosen": g["completions"][best],
                      "rejected": g["completions"][worst], "score_chosen": g["rewards"][best],
                      "score_rejected": g["rewards"][worst]})
    return pairs


def training_data(config: Config, data: str, iteration: int) -> tuple[str | None, str]:
    """The loss (None: `loss.type`) and the data file that loop iteration `iteration` trains on.

    Iteration 0 trains on the gold seed pairs: a K-sample loss (exo_rw, dpo_rw) cannot, so it is DPO there
    (beta = loss.beta), which also starts every loss of a comparison from the same pi_0. An iteration
    i >= 1 gets `data` = iter-i/judged.parquet and trains on, next to it:
      pairwise loss, loop.rewards=judge   judged.parquet itself (the judge's best vs worst pair)
      pairwise loss, loop.rewards=gold    gold_pairs.parquet: best vs worst sample by gold reward
      exo_rw / dpo_rw                     groups.parquet (judge rewards) or gold_groups.parquet: all K
    The files are written atomically once; a resumed loop reuses them.
    """
    from rayalign.data import write_rows_parquet
    from rayalign.objective import GROUP_LOSSES

    grouped, gold = config.loss.type in GROUP_LOSSES, config.loop.rewards == "gold"
    if iteration == 0:
        if not grouped:
            return None, data
        print(f"rayalign run: iteration 0: DPO on the gold seed pairs ({config.loss.type} needs K-sample groups)",
              flush=True)
        return "dpo", data
    judged_path = Path(data)
    if not (grouped or gold):
        return None, data
    out = judged_path.with_name(("gold_" if gold else "") + ("groups" if grouped else "pairs") + ".parquet")
    if not out.exists():
        judged = pd.read_parquet(judged_path)
        groups, counts = sample_groups(pd.read_parquet(judged_path.with_name("samples.parquet")), judged,
                                       rewards=config.loop.rewards)
        write_rows_parquet(groups if grouped else best_worst_pairs(groups), out)
        print(f"rayalign run: iteration {iteration}: {out.name}: {counts}", flush=True)
    return None, str(out)
