"""The judging stage (Ray Data): SPA direct preference judgment of each prompt's own samples.

A `Judge` actor holds the current policy pi_{i-1} and the initial SFT model. For every sample it computes
both sequence log-probs exactly (a forward pass each, on the tokenization every stage uses,
`rayalign.templating`: a message-list prompt through the chat template, the sample as that assistant
turn, ending at the end-of-turn eos the generator stopped at) and the
implicit reward r = beta * (log pi_{i-1}(y|x) - log pi_SFT(y|x)); the prompt's chosen sample is the argmax,
the rejected one the argmin (ALGORITHMS.md §5). Pairs whose completions are empty or identical, or whose
rewards tie exactly, are dropped and counted. The output keeps the judgment's margin and confidence.
A pair of a message-list prompt is written as its rendered text (`prompt` = the templated prompt, `chosen` /
`rejected` = what the template puts after it, e.g. "...<|im_end|>\n"): an ordinary pair file that training
tokenizes to the very ids judged here; `chosen_text` / `rejected_text` keep the plain contents.

With judge.type=reward_model the judge ranks by judge.reward_model's scores instead (the iterative
DPO-with-RM baseline; `rayalign.reward_judge`): same pair selection, same drops, same columns, the RM scores
in `judge_rewards` and the margin and confidence (sigma(margin), Bradley-Terry) computed from them; the two
log-probs are still computed (the evaluation's KL reads them). Each kept pair also gets its two log-probs
under the judging policy as `ref_chosen_logps` / `ref_rejected_logps` (and `sample_groups` rows `ref_logps`):
in the loop that policy, pi_{i-1}, is the reference of iteration i's training, which reads them instead of
scoring the reference again (`rayalign.loop`, ref.reuse_judge). With eval.reward_model the evaluation
prompts' samples also get that model's scores (`rm_rewards`), which judged.parquet leaves out.

The pure math is `rayalign.core.spa` and `rayalign.core.reward_model`; this module only moves data through
the models.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from rayalign.config import Config
from rayalign.data.formats import GROUP_REFERENCE_FIELD
from rayalign.stage_timing import ACTOR_START, GENERATE, JUDGE, ActorClock, drop_timing
from rayalign.templating import MESSAGES_COLUMN

DROP_REASONS = ("empty", "identical", "tie")
RENDERED_PROMPT = "rendered_prompt"  # a frame with message-list prompts: the templated prompt text
# the generation's columns (its timing too: `rayalign.stage_timing`), so one pipeline yields both artifacts
PASSTHROUGH = ("texts", "token_ids", "logprobs", "finish_reasons", GENERATE, ACTOR_START)


class Judge:
    """Ray Data callable class: per-prompt rows with their sample texts -> one judged pair per prompt."""

    def __init__(self, policy_path: str, sft_path: str, config: Config):
        from rayalign.devices import inference_dtype, stage_device
        from rayalign.models import LoadOptions, load_model, load_tokenizer
        from rayalign.storage import materialize

        self.clock = ActorClock()
        policy_path, sft_path = materialize(policy_path), materialize(sft_path)  # run.storage: node-local copies
        load = LoadOptions.of(config.model)
        self.tokenizer = load_tokenizer(policy_path, load)
        self.device = stage_device(config.judge.gpus_per_actor, "judge")
        placement = {"dtype": inference_dtype(config.judge.dtype, config.judge.gpus_per_actor), "device": self.device}
        self.policy = load_model(policy_path, load, **placement)
        self.sft = load_model(sft_path, load, **placement)
        self.config = config
        self.reward_models = None
        if config.judge.type == "reward_model" or config.eval.reward_model:
            from rayalign.reward_judge import RewardModels

            self.reward_models = RewardModels(config)
        self.clock.ready()

    def held_models(self) -> list:
        """Every model this judge holds: the policy, pi_SFT and any reward models (None where not loaded)."""
        rewards = self.reward_models
        return [self.policy, self.sft, *((r.model for r in (rewards.judge, rewards.eval) if r) if rewards else ())]

    def _logps(self, model, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
        from rayalign.step import completion_logps

        return completion_logps(model, prompts, completions, pad_token_id=self.tokenizer.pad_token_id,
                                chunk_rows=self.config.model.head_chunk_tokens)

    def encode(self, batch: pd.DataFrame) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt and completion ids of every sample of `batch`, prompt-major (`rayalign.templating`)."""
        from rayalign.templating import completion_ids, prompt_ids, prompt_values, render_prompt

        data, prompts, completions = self.config.data, [], []
        for prompt, texts in zip(prompt_values(batch), batch["texts"]):
            rendered = render_prompt(self.tokenizer, prompt)
            ids = prompt_ids(self.tokenizer, prompt, data.max_prompt_length, prompt_text=rendered)[0]
            for text in texts:
                prompts.append(ids)
                completions.append(completion_ids(self.tokenizer, prompt, text, data.max_completion_length,
                                                  prompt_text=rendered)[0])
        return prompts, completions

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from rayalign.core.spa import implicit_rewards, judge_confidence, judge_pairs

        began = time.perf_counter()
        prompt_ids, completion_ids = self.encode(batch)
        policy = self._logps(self.policy, prompt_ids, completion_ids)
        sft = self._logps(self.sft, prompt_ids, completion_ids)
        shape = (len(batch), len(batch["texts"].iloc[0]))  # (prompts, samples per prompt)
        policy, sft = policy.view(shape), sft.view(shape)
        if self.config.judge.type == "reward_model":
            from rayalign.core.reward_model import reward_model_judgment

            rewards = self.reward_models.judge_scores(batch)
            chosen, rejected, margin = reward_model_judgment(rewards)[:3]
        else:
            rewards = implicit_rewards(policy, sft, beta=self.config.judge.beta)
            chosen, rejected, margin = judge_pairs(rewards)[:3]
        confidence = judge_confidence(margin)
        out = pd.DataFrame([self._row(batch, i, int(chosen[i]), int(rejected[i]), float(margin[i]),
                                      float(confidence[i]), rewards[i], policy[i], sft[i])
                            for i in range(len(batch))])
        for column in PASSTHROUGH:
            if column in batch:
                out[column] = list(batch[column])
        if self.config.eval.reward_model:
            from rayalign.reward_judge import EVAL_REWARDS

            out[EVAL_REWARDS] = self.reward_models.eval_scores(
                batch, rewards if self.config.judge.type == "reward_model" else None)
        return self.clock.stamp(self._render_chat_pairs(batch, out), JUDGE, began)

    def _render_chat_pairs(self, batch: pd.DataFrame, out: pd.DataFrame) -> pd.DataFrame:
        """Pairs of message-list prompts as rendered text (see the module docstring); string pairs as they are."""
        from rayalign.templating import is_messages, prompt_values, render_completion, render_prompt

        if MESSAGES_COLUMN not in batch:  # a frame of string prompts only (every batch of it: one schema)
            return out
        prompts = prompt_values(batch)
        out[MESSAGES_COLUMN] = [is_messages(p) for p in prompts]  # `prompt` as given: eval/*.parquet keeps it
        out["chosen_text"], out["rejected_text"] = list(out["chosen"]), list(out["rejected"])
        rendered = [render_prompt(self.tokenizer, p) for p in prompts]
        for side in ("chosen", "rejected"):
            out[side] = [render_completion(self.tokenizer, p, c, text)
                         for p, c, text in zip(prompts, out[side], rendered)]
        out[RENDERED_PROMPT] = rendered
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

    from rayalign.devices import actor_resources

    resources = actor_resources(config.judge.gpus_per_actor, config.judge.resources)
    return dataset.map_batches(
        Judge, fn_constructor_args=(policy_path, sft_path, config), batch_format="pandas",
        batch_size=config.judge.batch_size, compute=ray.data.ActorPoolStrategy(size=config.judge.num_actors),
        num_cpus=config.judge.cpus_per_actor, **resources)


def write_judged(judged: pd.DataFrame, out_path: Path) -> dict:
    """Write the kept pairs (explicit format + judgment columns) atomically; return the counts."""
    from rayalign.data import write_rows_parquet

    judged = drop_timing(judged).sort_values("prompt_id").reset_index(drop=True)
    from rayalign.reward_judge import EVAL_REWARDS

    # the pairs only: generation columns and the evaluation model's scores belong to the other artifacts
    kept = judged[judged["dropped"] == ""].drop(
        columns=["dropped", *[c for c in (*PASSTHROUGH, EVAL_REWARDS) if c in judged]])
    # The pair's log-probs under the judging policy: the reference's of the training that starts from it
    kept = kept.assign(**{f"ref_{side}_logps": [float(logps[i]) for logps, i in zip(kept["policy_logps"],
                                                                                  kept[f"{side}_index"])]
                          for side in ("chosen", "rejected")})
    if RENDERED_PROMPT in kept:  # message-list prompts: the pair file holds the rendered text (module docstring)
        kept = kept.assign(prompt=kept[RENDERED_PROMPT]).drop(columns=[RENDERED_PROMPT, MESSAGES_COLUMN])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_rows_parquet(kept.to_dict("records"), out_path)
    counts = {"prompts": len(judged), "pairs": len(kept)}
    counts.update({f"dropped_{reason}": int((judged["dropped"] == reason).sum()) for reason in DROP_REASONS})
    return counts


GROUP_DROP_REASONS = ("empty", "identical", "tied")


def sample_groups(samples: pd.DataFrame, judged: pd.DataFrame | None, *, rewards: str,
                  tokenizer=None) -> tuple[list[dict], dict]:
    """An iteration's K samples per prompt as k_sample rows {id, prompt, completions, rewards}, and counts.

    `samples` is the generation artifact (one row per sample). `rewards="judge"` takes the judge's rewards
    from `judged` (implicit, or judge.reward_model's scores; its kept prompts: the others tie or have an
    empty best/worst sample);
    `rewards="gold"` scores every sample with the sentiment task's gold reward. A group is dropped when a
    sample is empty (as the judge drops empty pairs), all K texts are the same, or all K rewards tie (the
    target is then uniform: no preference to learn). A message-list prompt's row holds its rendered text
    and its completions as the template renders them (as the judge writes pairs), with `tokenizer`.
    """
    from rayalign.tasks.sentiment import gold_reward
    from rayalign.templating import is_messages, prompt_value, render_completion, render_prompt

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
        prompt = prompt_value(group.iloc[0])
        if is_messages(prompt):
            if tokenizer is None:
                raise ValueError("K-sample groups of message-list prompts need the policy's tokenizer to render them")
            text = render_prompt(tokenizer, prompt)
            texts = [render_completion(tokenizer, prompt, t, text) for t in texts]
            prompt = text
        # the judged pass's log-probs of the samples under pi_{i-1}: the next training's reference log-probs
        ref = {GROUP_REFERENCE_FIELD: [float(v) for v in group["policy_logp"]]} if "policy_logp" in group else {}
        rows.append({"id": int(prompt_id), "prompt": prompt, "completions": texts, "rewards": values, **ref})
    counts["groups"] = len(rows)
    return rows, counts


def best_worst_pairs(groups: list[dict]) -> list[dict]:
    """Explicit pairs from k_sample rows: the highest- vs the lowest-reward sample (first index on ties)."""
    pairs = []
    for g in groups:
        best = max(range(len(g["rewards"])), key=lambda i: g["rewards"][i])
        worst = min(range(len(g["rewards"])), key=lambda i: g["rewards"][i])
        ref = g.get(GROUP_REFERENCE_FIELD)
        pairs.append({"id": g["id"], "prompt": g["prompt"], "chosen": g["completions"][best],
                      "rejected": g["completions"][worst], "score_chosen": g["rewards"][best],
                      "score_rejected": g["rewards"][worst],
                      **({"ref_chosen_logps": ref[best], "ref_rejected_logps": ref[worst]} if ref else {})})
    return pairs


def training_data(config: Config, data: str, iteration: int, *, tokenizer_path: str | None = None
                  ) -> tuple[str | None, str]:
    """The loss (None: `loss.type`) and the data file that loop iteration `iteration` trains on.

    Iteration 0 trains on the gold seed pairs: a K-sample loss (exo_rw, dpo_rw) cannot, so it is DPO there
    (beta = loss.beta), which also starts every loss of a comparison from the same pi_0. An iteration
    i >= 1 gets `data` = iter-i/judged.parquet and trains on, next to it:
      pairwise loss, loop.rewards=judge   judged.parquet itself (the judge's best vs worst pair)
      pairwise loss, loop.rewards=gold    gold_pairs.parquet: best vs worst sample by gold reward
      exo_rw / dpo_rw                     groups.parquet (judge rewards) or gold_groups.parquet: all K
    The files are written atomically once; a resumed loop reuses them. `tokenizer_path` (the judging
    policy's) renders message-list prompts there; it is loaded only when the samples have such prompts.
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
        judged, samples = pd.read_parquet(judged_path), pd.read_parquet(judged_path.with_name("samples.parquet"))
        tokenizer = None
        if tokenizer_path and MESSAGES_COLUMN in samples and samples[MESSAGES_COLUMN].any():
            from rayalign.models import LoadOptions, load_tokenizer

            tokenizer = load_tokenizer(tokenizer_path, LoadOptions.of(config.model))
        groups, counts = sample_groups(samples, judged, rewards=config.loop.rewards, tokenizer=tokenizer)
        write_rows_parquet(groups if grouped else best_worst_pairs(groups), out)
        print(f"rayalign run: iteration {iteration}: {out.name}: {counts}", flush=True)
    return None, str(out)
