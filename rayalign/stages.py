"""One stage of the loop at a time: `rayalign generate`, `rayalign judge`, `rayalign eval`.

The stages read and write the loop's own artifacts (same columns, atomic writes, completion markers) and
give prompts the loop's ids, hence the loop's per-prompt seeds: `rayalign generate --iteration 2` with the
loop's pi_1 reproduces that run's `iter-2/samples.parquet`. The loop (`rayalign.loop`) runs generation and
judging in one Ray Data pass through `judged_pass`; these commands run them one at a time, so a stage can
be redone, inspected or swapped for another implementation. Training is `rayalign train`; nothing here
trains or builds models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from rayalign.config import Config, ConfigError
from rayalign.data.prompts import EVAL_PROMPT_ID, ITERATION_PROMPT_ID, Prompt
from rayalign.io import atomic_write_text
from rayalign.models import LoadOptions
from rayalign.templating import prompt_columns

SAMPLE_COLUMNS = ("prompt_id", "sample_index", "prompt", "text")


def _log(command: str, message: str) -> None:
    print(f"rayalign {command}: {message}", flush=True)


def plan_prompts(config: Config) -> tuple[list[list[Prompt]], list[Prompt]]:
    """The loop's prompt set of every iteration and its held-out evaluation prompts.

    From `data.prompts_file` (`load_prompts`; the first `eval.prompts`, at most a fifth, are held out),
    else the embedded sentiment task's seeded prompts. A prompt's place in these lists gives its id
    (`iteration_frame`, `eval_frame`), so the same source, split and settings give the same ids on resume.
    """
    from rayalign.tasks import sentiment

    iterations, per = config.loop.iterations, config.loop.prompts_per_iteration
    if config.data.prompts_file:
        prompts = load_prompts(config)
        held = min(config.eval.prompts, len(prompts) // 5)
        eval_prompts, prompts = prompts[:held], prompts[held:]
        per = per or len(prompts) // max(1, iterations)
    else:
        prompts = sentiment.make_prompts(per * iterations, seed=config.data.seed + 101)
        eval_prompts = sentiment.make_prompts(config.eval.prompts, seed=config.data.seed + 202)
    return [prompts[i * per:(i + 1) * per] for i in range(iterations)], eval_prompts


def load_prompts(config: Config) -> list[Prompt]:
    """The prompts of `data.prompts_file`, in source order: text, or messages for conversational rows.

    Any format gives prompts (pairs give theirs, `messages` rows drop their trailing assistant turns; see
    `rayalign.data.prompts`). The split is `data.prompts_split`, else `data.split`; the subset
    `data.prompts_subset`, else `data.subset`. Errors name the key the split or subset came from."""
    from rayalign.data import Selection, load_rows

    data = config.data
    select = Selection(split=data.prompts_split or data.split, subset=data.prompts_subset or data.subset,
                       split_key="data.prompts_split" + ("" if data.prompts_split else " (unset: data.split)"),
                       subset_key="data.prompts_subset" + ("" if data.prompts_subset else " (unset: data.subset)"))
    return [r["prompt"] for r in load_rows(data.prompts_file, select=select, as_prompts=True).rows]


def prompt_frame(prompts: list[Prompt], first_id: int) -> pd.DataFrame:
    """Columns prompt_id, prompt and prompt_messages (`rayalign.templating.prompt_columns`)."""
    return pd.DataFrame({"prompt_id": [first_id + k for k in range(len(prompts))], **prompt_columns(prompts)})


def iteration_frame(prompts: list[Prompt], iteration: int) -> pd.DataFrame:
    return prompt_frame(prompts, iteration * ITERATION_PROMPT_ID)


def eval_frame(eval_prompts: list[Prompt]) -> pd.DataFrame:
    return prompt_frame(eval_prompts, EVAL_PROMPT_ID)


def judged_pass(config: Config, prompts: pd.DataFrame, *, model: str, sft_path: str, pool=None, judges=None,
                tag: str | None = None, sams_below_id: int | None = None) -> pd.DataFrame:
    """One Ray Data pass: Generator actors (`model`) chained into Judge actors (`model` vs `sft_path`).

    `model` and `sft_path` are what the actors open: `StageStorage.inputs` of the driver's paths. With `pool`
    (a `rayalign.generator_pool.GeneratorPool`) its long-lived hosts generate, holding the weights of `tag`
    (the driver's path of `model`); with `judges` (a `rayalign.judge_pool.JudgePool`), so do the judges. With
    `sams_below_id`, SamS scoring actors follow the judges and score the pairs of prompt ids below it
    (`rayalign.sams_score`, with the bandit in `model`'s sams.pt). Returns one row per prompt: the generation's
    list columns and the judgment (see `rayalign.judge`).
    """
    from rayalign.generate import generation_dataset
    from rayalign.judge import judge_dataset

    if pool is not None:
        dataset = pool.dataset(prompts, model=model, tag=tag or model)
    else:
        dataset = generation_dataset(prompts, model, config.generate, load=LoadOptions.of(config.model))
    if judges is not None:
        judged = judges.chain(dataset, policy=model, tag=tag or model, sft_path=sft_path)
    else:
        judged = judge_dataset(dataset, policy_path=model, sft_path=sft_path, config=config)
    if sams_below_id is not None:
        from rayalign.sams_score import score_dataset

        judged = score_dataset(judged, policy_path=model, config=config, below_id=sams_below_id)
    rows = judged.to_pandas()
    for hosts in (pool, judges):  # offload_between_passes: their device memory to the stages that follow
        if hosts is not None:
            hosts.release()
    return rows


def with_gold_rewards(rows: pd.DataFrame, config: Config) -> pd.DataFrame:
    """Per-prompt rows sorted by id, with each sample's gold reward when the task has one."""
    from rayalign.tasks.sentiment import gold_reward

    rows = rows.sort_values("prompt_id").reset_index(drop=True)
    if config.loop.task == "sentiment":
        rows["gold_rewards"] = [[gold_reward(t) for t in texts] for texts in rows["texts"]]
    return rows


def write_eval(rows: pd.DataFrame, config: Config, path: Path) -> pd.DataFrame:
    from rayalign.data import write_rows_parquet
    from rayalign.stage_timing import drop_timing

    rows = with_gold_rewards(drop_timing(rows), config)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_rows_parquet(rows.to_dict("records"), path)
    return rows


def read_sample_groups(path: str | Path) -> pd.DataFrame:
    """A samples Parquet (one row per sample) -> one row per prompt with list columns, as Generator emits.

    Checks what the judge relies on and names the file and field when it is not so.
    """
    from rayalign.templating import MESSAGES_COLUMN, messages_flag
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--samples: {path} does not exist (write it with `rayalign generate`)")
    samples = pd.read_parquet(path)
    missing = [c for c in SAMPLE_COLUMNS if c not in samples.columns]
    if missing:
        raise ConfigError(f"--samples: {path} lacks column(s) {', '.join(missing)}; "
                          f"a samples file has {', '.join(SAMPLE_COLUMNS)}")
    groups = []
    for prompt_id, group in samples.sort_values(["prompt_id", "sample_index"]).groupby("prompt_id", sort=True):
        if list(group["sample_index"]) != list(range(len(group))):
            raise ConfigError(f"--samples: {path}: prompt_id {prompt_id}: sample_index must be 0..{len(group) - 1}, "
                              f"got {list(group['sample_index'])}")
        # Only what the judge reads: the judged file leaves the generation columns out anyway.
        flag = {MESSAGES_COLUMN: messages_flag(group[MESSAGES_COLUMN].iloc[0])} if MESSAGES_COLUMN in group else {}
        groups.append({"prompt_id": int(prompt_id), "prompt": group["prompt"].iloc[0], **flag,
                       "texts": list(group["text"])})
    sizes = {len(g["texts"]) for g in groups}
    if not groups or len(sizes) != 1 or min(sizes) < 2:
        raise ConfigError(f"--samples: {path}: every prompt needs the same number (>= 2) of samples; "
                          f"found {sorted(sizes) or 'no rows'}")
    return pd.DataFrame(groups)


def _require_model(config: Config, field: str, why: str) -> str:
    from rayalign.models import resolve_name_or_path

    value = getattr(config.model, field.split(".")[1])
    if not value:
        raise ConfigError(f"{field}: set it to {why}")
    try:
        return resolve_name_or_path(value)
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc}") from None


def _check_template(prompts: list, model: str, config: Config) -> None:
    """Message-list prompts need a chat template on `model`'s tokenizer: a config error before any work."""
    from rayalign.templating import check_prompts_template

    check_prompts_template(prompts, model, source=config.data.prompts_file, load=LoadOptions.of(config.model))


def _no_storage(config: Config, command: str) -> None:
    if config.run.storage:
        raise ConfigError(f"run.storage: not supported by `rayalign {command}` yet (its outputs stay in run.dir); "
                          "`rayalign run` and `rayalign train` support it")


def run_generate(config: Config, *, iteration: int | None = None) -> int:
    """Sample `generate.num_samples` completions per prompt with model.policy -> RUN_DIR/samples.parquet."""
    _no_storage(config, "generate")
    from rayalign.generate import generation_dataset, write_samples
    from rayalign.train import ensure_ray

    policy = _require_model(config, "model.policy", "the model to sample from")
    sets, _ = plan_prompts(config)
    _check_template([p for prompts in sets for p in prompts], policy, config)
    if iteration is not None and not 1 <= iteration <= len(sets):
        raise ConfigError(f"--iteration: must be in 1..{len(sets)} (loop.iterations); got {iteration}")
    chosen = [iteration] if iteration is not None else range(1, len(sets) + 1)
    prompts = pd.concat([iteration_frame(sets[i - 1], i) for i in chosen], ignore_index=True)
    if prompts.empty:
        raise ConfigError("data.prompts_file: no prompts left to sample (after the held-out evaluation prompts)")
    out = Path(config.run.dir) / "samples.parquet"
    ensure_ray()
    _log("generate", f"{len(prompts)} prompts x {config.generate.num_samples} samples with {policy}")
    groups = generation_dataset(prompts, policy, config.generate,
                                load=LoadOptions.of(config.model)).to_pandas()
    samples = write_samples(groups, out)
    _log("generate", f"wrote {len(samples)} samples to {out}")
    return 0


def run_judge(config: Config, *, samples: str | None = None) -> int:
    """SPA self-judging of a samples file: model.policy vs model.reference -> RUN_DIR/judged.parquet."""
    _no_storage(config, "judge")
    import ray

    from rayalign.judge import judge_dataset, write_judged
    from rayalign.train import ensure_ray

    policy = _require_model(config, "model.policy", "the policy whose implicit reward judges (pi_{i-1})")
    sft = _require_model(config, "model.reference", "the SFT model the implicit reward compares with")
    run_dir = Path(config.run.dir)
    groups = read_sample_groups(samples or run_dir / "samples.parquet")
    ensure_ray()
    _log("judge", f"{len(groups)} prompts x {len(groups['texts'].iloc[0])} samples: {policy} vs {sft}")
    judged = judge_dataset(ray.data.from_pandas(groups), policy_path=policy, sft_path=sft, config=config)
    counts = write_judged(judged.to_pandas(), run_dir / "judged.parquet")
    atomic_write_text(run_dir / "judge_counts.json", json.dumps(counts) + "\n")  # completion marker, last
    _log("judge", f"{counts['pairs']} pairs of {counts['prompts']} prompts -> {run_dir / 'judged.parquet'} "
         f"(dropped: {counts['dropped_empty']} empty, {counts['dropped_identical']} identical, "
         f"{counts['dropped_tie']} ties)")
    return 0


def run_eval(config: Config, *, baseline: str | None = None) -> int:
    """model.policy vs a baseline on the loop's held-out prompts -> RUN_DIR/eval/ and summary.json."""
    _no_storage(config, "eval")
    from rayalign.evaluate import kl_to_sft
    from rayalign.train import ensure_ray

    policy = _require_model(config, "model.policy", "the model to evaluate")
    sft = _require_model(config, "model.reference", "the SFT model (KL and the default baseline)")
    if baseline:
        from rayalign.models import resolve_name_or_path

        try:
            baseline = resolve_name_or_path(baseline)
        except ValueError as exc:
            raise ConfigError(f"--baseline: {exc}") from None
    baseline = baseline or sft
    _, eval_prompts = plan_prompts(config)
    _check_template(eval_prompts, policy, config)
    out = Path(config.run.dir) / "eval"
    ensure_ray()
    from rayalign.stage_storage import StageStorage

    policy, sft, baseline = StageStorage(config).inputs(policy, sft, baseline)  # run.storage: actors on any node
    _log("eval", f"{policy} vs {baseline} on {len(eval_prompts)} held-out prompts")
    rows = write_eval(judged_pass(config, eval_frame(eval_prompts), model=policy, sft_path=sft), config,
                      out / "policy.parquet")
    summary = {"policy": policy, "baseline": baseline, "prompts": len(rows), "kl_to_sft": kl_to_sft(rows)}
    if config.loop.task == "sentiment" or config.eval.reward_model:
        summary.update(_baseline_scores(config, rows, eval_frame(eval_prompts), baseline=baseline, sft=sft,
                                        out=out / "baseline.parquet"))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")  # completion marker, last
    print(json.dumps(summary, indent=2), flush=True)
    return 0


def _baseline_scores(config: Config, rows: pd.DataFrame, prompts: pd.DataFrame, *, baseline: str, sft: str,
                     out: Path) -> dict:
    """The policy's win rates against the baseline's samples (gold reward; eval.reward_model's `rm/*`)."""
    from rayalign.evaluate import RM_PREFIX, compare, compare_rm
    from rayalign.generate import generation_dataset

    if config.eval.reward_model:  # the Judge actors score the samples with it: the policy's pass, on the baseline
        base = judged_pass(config, prompts, model=baseline, sft_path=sft)
    else:
        base = generation_dataset(prompts, baseline, config.generate,
                                  load=LoadOptions.of(config.model)).to_pandas()
    base_rows = write_eval(base, config, out)
    scores = {}
    if config.loop.task == "sentiment":
        scores.update(compare(rows, {"baseline": base_rows}),
                      baseline_gold_reward_mean=compare(base_rows, {})["gold_reward_mean"])
    if config.eval.reward_model:
        scores.update(compare_rm(rows, {"baseline": base_rows}))
        scores[f"{RM_PREFIX}baseline_reward_mean"] = compare_rm(base_rows, {})[f"{RM_PREFIX}reward_mean"]
    return scores
