"""SamS in the loop's Ray Data pass: each judged pair scored by the scheduler the previous iteration trained.

After the Judge actors, a pool of `SamsScorer` actors takes the judged rows (one per prompt), encodes each
kept pair as the training stage will (`rayalign.encode.encode_row` with the data's length limits), runs the
judging policy once over [chosen; rejected] with hidden states (`rayalign.step.sequence_scores`), builds
SamS's per-pair context from them (`rayalign.core.sams.context_features`) and writes the bandit's
exploitation score f_S(context), its predicted value of training on the pair, as `sams_score` (NaN for a
dropped row). The bandit is the one in `sams.pt` of the judging policy's directory: the previous iteration's
final/, the same state the next training stage continues from (`StageInputs.sams_state`).

Only the iteration passes of `rayalign run` with `sams.enabled=true` and `sams.selector=bandit` score; a
judging policy without `sams.pt` (a stage trained before SamS was enabled) gives NaN scores and a warning.
The scores are read, not acted on, outside training: the training stage's selection is the bandit's own.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

from rayalign.config import Config

SCORE_COLUMN = "sams_score"


def scores_pairs(config: Config) -> bool:
    """Whether the loop's iteration passes add `sams_score` (a bandit, whose state the stages carry)."""
    return config.sams.enabled and config.sams.selector == "bandit"


class SamsScorer:
    """Ray Data callable class: judged per-prompt rows -> the same rows with `sams_score`."""

    def __init__(self, policy_path: str, config: Config, below_id: int | None = None):
        from rayalign.devices import inference_dtype, stage_device
        from rayalign.models import LoadOptions, load_model, load_tokenizer
        from rayalign.sams_select import STATE_FILE, PairSelector
        from rayalign.storage import materialize

        policy_path = materialize(policy_path)  # run.storage: this node's copy
        load = LoadOptions.of(config.model)
        self.tokenizer = load_tokenizer(policy_path, load)
        judge = config.judge  # the judging policy, placed as the judge places it
        self.model = load_model(policy_path, load, dtype=inference_dtype(judge.dtype, judge.gpus_per_actor),
                                device=stage_device(judge.gpus_per_actor, "judge"))
        self.config, self.below_id, self.scheduler = config, below_id, None
        if (Path(policy_path) / STATE_FILE).is_file():
            model_config = self.model.config
            selector = PairSelector(config, num_layers=model_config.num_hidden_layers,
                                    hidden_size=model_config.hidden_size, total_steps=1)
            selector.load(Path(policy_path))
            self.scheduler = selector.scheduler
        else:
            print(f"rayalign run: warning: no {STATE_FILE} in {policy_path}: the judged pairs get no SamS score",
                  flush=True)

    def contexts(self, pairs: list[dict]) -> torch.Tensor:
        """(n, L, D) SamS contexts of {prompt, chosen, rejected} text pairs under the judging policy."""
        from rayalign.data_kind import PAIRS
        from rayalign.encode import collate, encode_row
        from rayalign.step import sequence_scores

        data = self.config.data
        encoded = [encode_row(self.tokenizer, pair, PAIRS, max_prompt_length=data.max_prompt_length,
                              max_completion_length=data.max_completion_length) for pair in pairs]
        batch = collate(encoded, PAIRS, pad_token_id=self.tokenizer.pad_token_id)
        with torch.no_grad():
            scores = sequence_scores(self.model, {k: v.to(self.model.device) for k, v in batch.items()},
                                     kind=PAIRS, want_context=True, chunk_rows=self.config.model.head_chunk_tokens)
        return scores.context

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from rayalign.judge import RENDERED_PROMPT

        out = batch.copy()
        limit = math.inf if self.below_id is None else self.below_id  # e.g. the pass's evaluation prompts
        kept = [i for i, (reason, prompt_id) in enumerate(zip(batch["dropped"], batch["prompt_id"]))
                if reason == "" and prompt_id < limit]
        values = [math.nan] * len(batch)
        if self.scheduler is not None and kept:
            prompts = batch[RENDERED_PROMPT] if RENDERED_PROMPT in batch else batch["prompt"]
            pairs = [{"prompt": prompts.iloc[i], "chosen": batch["chosen"].iloc[i],
                      "rejected": batch["rejected"].iloc[i]} for i in kept]
            predicted = self.scheduler.predict(self.contexts(pairs))
            for i, value in zip(kept, predicted.tolist(), strict=True):
                values[i] = float(value)
        out[SCORE_COLUMN] = values
        return out


def score_dataset(dataset, *, policy_path: str, config: Config, below_id: int | None = None):
    """Chain a `SamsScorer` actor pool (the judge's size, resources and batch) onto a judged Ray Dataset; rows
    with a prompt id of `below_id` or more get NaN."""
    import ray

    from rayalign.devices import actor_resources

    judge = config.judge
    return dataset.map_batches(
        SamsScorer, fn_constructor_args=(policy_path, config, below_id), batch_format="pandas",
        batch_size=judge.batch_size, compute=ray.data.ActorPoolStrategy(size=judge.num_actors),
        num_cpus=judge.cpus_per_actor, **actor_resources(judge.gpus_per_actor, judge.resources))


def score_summary(judged: pd.DataFrame, agreement: list[bool | None] | None = None) -> dict[str, float]:
    """The iteration record's SamS numbers from judged.parquet: the mean score and, when each pair's label is
    known to be right or wrong (`agreement`, e.g. with the task's gold reward; None: unknown), the mean score
    of the right ones minus that of the wrong ones (> 0: the bandit values correctly labelled pairs more)."""
    if SCORE_COLUMN not in judged or not judged[SCORE_COLUMN].notna().any():
        return {}
    scores = [float(s) for s in judged[SCORE_COLUMN]]
    summary = {"sams/score_mean": sum(s for s in scores if s == s) / sum(s == s for s in scores)}
    if agreement is not None:
        right = [s for s, ok in zip(scores, agreement, strict=True) if ok is True and s == s]
        wrong = [s for s, ok in zip(scores, agreement, strict=True) if ok is False and s == s]
        if right and wrong:
            summary["sams/score_gap"] = sum(right) / len(right) - sum(wrong) / len(wrong)
    return summary
