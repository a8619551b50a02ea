"""The generation stage (Ray Data): prompts -> `Generator` actors -> a Parquet file of samples.

    ray.data.from_pandas(prompt blocks).map_batches(Generator, compute=ActorPoolStrategy(size=generate.num_actors))

The actors emit one row per prompt (list columns, so a chained stage such as the judge sees whole
groups); the artifact has one row per sample: prompt_id, sample_index, prompt, text, token_ids, logprobs
(model log-prob of each sampled token), logp_sum, finish_reason, and `prompt_messages` when the prompt
frame has it (a prompt is a string or a message list: `rayalign.templating.prompt_columns`; messages are
rendered with the model's chat template, `text` is the assistant's content, `token_ids` end at eos).
Samples of the loop's judged pass also have `policy_logp`: the judge's exact log-prob of the sample under
the model that sampled it (on training's tokenization; the next iteration's reference log-prob).
The actors also report their seconds (`rayalign.stage_timing`; the artifacts leave them out).
The file is written atomically, so a resumed loop either finds the whole stage output or redoes the
stage. Backends live in `rayalign.samplers`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from rayalign.config import GenerateConfig
from rayalign.models import LoadOptions


class Generator:
    """Ray Data callable class holding one sampler (HF or vLLM) for the actor's lifetime."""

    def __init__(self, model_path: str, config: GenerateConfig, tokenizer_path: str | None = None,
                 load: LoadOptions | None = None):
        from rayalign.samplers import build_sampler
        from rayalign.stage_timing import ActorClock
        from rayalign.storage import materialize

        self.clock = ActorClock()
        # A storage location (run.storage) becomes this node's cached copy; a local path or hub id stays.
        model_path, tokenizer_path = materialize(model_path), tokenizer_path and materialize(tokenizer_path)
        self.sampler = build_sampler(config.backend, model_path, config, tokenizer_path=tokenizer_path, load=load)
        self.clock.ready()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # One row per prompt with list columns, so a downstream stage always sees a prompt's whole group.
        from rayalign.stage_timing import GENERATE
        from rayalign.templating import MESSAGES_COLUMN, messages_flag, prompt_values

        began = time.perf_counter()
        prompt_ids = [int(i) for i in batch["prompt_id"]]
        results = self.sampler.sample(prompt_values(batch), prompt_ids)
        flags = {MESSAGES_COLUMN: [messages_flag(f) for f in batch[MESSAGES_COLUMN]]} if MESSAGES_COLUMN in batch \
            else {}
        return self.clock.stamp(pd.DataFrame({
            "prompt_id": prompt_ids, "prompt": list(batch["prompt"]), **flags,
            "texts": [[s.text for s in samples] for samples in results],
            "token_ids": [[s.token_ids for s in samples] for samples in results],
            "logprobs": [[s.logprobs for s in samples] for samples in results],
            "finish_reasons": [[s.finish_reason for s in samples] for samples in results],
        }), GENERATE, began)


def explode_samples(groups: pd.DataFrame) -> pd.DataFrame:
    """Per-prompt groups -> the stage artifact's one row per sample (with `sample_index` and `logp_sum`)."""
    from rayalign.templating import MESSAGES_COLUMN, messages_flag

    rows, judged = [], "policy_logps" in groups  # the judge's pass: its exact log-probs of each sample
    for group in groups.sort_values("prompt_id").itertuples(index=False):
        flag = {MESSAGES_COLUMN: messages_flag(getattr(group, MESSAGES_COLUMN))} if MESSAGES_COLUMN in groups else {}
        for index, text in enumerate(group.texts):
            logprobs = list(group.logprobs[index])
            rows.append({"prompt_id": int(group.prompt_id), "sample_index": index, "prompt": group.prompt, **flag,
                         "text": text, "token_ids": list(group.token_ids[index]), "logprobs": logprobs,
                         "logp_sum": float(sum(logprobs)), "finish_reason": group.finish_reasons[index],
                         **({"policy_logp": float(group.policy_logps[index])} if judged else {})})
    return pd.DataFrame(rows)


def generation_dataset(prompts: pd.DataFrame, model_path: str, config: GenerateConfig, *,
                       tokenizer_path: str | None = None, load: LoadOptions | None = None):
    """The lazy Ray Data pipeline of one generation pass over `prompts` (columns prompt_id, prompt and,
    for message-list prompts, prompt_messages: `rayalign.templating.prompt_columns`).

    Samples are seeded per (generate.seed, prompt_id), so callers give prompts stable, distinct ids.
    """
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    from rayalign.devices import actor_resources

    resources = actor_resources(config.gpus_per_actor, config.resources)
    return ray.data.from_pandas(prompt_blocks(prompts, config.batch_size)).map_batches(
        Generator, fn_constructor_args=(model_path, config, tokenizer_path, load), batch_format="pandas",
        batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        num_cpus=config.cpus_per_actor, **resources)


def prompt_blocks(prompts: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """The prompt columns in blocks of `batch_size`. One block per actor call: a block is one task, and its output
    moves on (to a chained judge) only when the task ends, so a single block would make the judge wait for every
    sample and one actor take all."""
    from rayalign.templating import MESSAGES_COLUMN

    frame = prompts[["prompt_id", "prompt", *([MESSAGES_COLUMN] if MESSAGES_COLUMN in prompts else [])]]
    return [frame.iloc[i:i + batch_size] for i in range(0, len(frame), batch_size)] or [frame]


def write_samples(groups: pd.DataFrame, out_path: Path) -> pd.DataFrame:
    from rayalign.data import write_rows_parquet

    samples = explode_samples(groups)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_rows_parquet(samples.to_dict("records"), out_path)
    return samples
