"""`rayalign run`: the SPA iterative loop, one resumable stage at a time.

    setup      tiny model + SFT on the task corpus (when model.policy is empty), seed pairs, prompts
    iter 0     pi_0 = DPO on the gold seed pairs from pi_SFT (reference pi_SFT), loop.seed_epochs
    iter i     generate on prompt subset i with pi_{i-1} -> judge (pi_{i-1} vs pi_SFT) -> train pi_i from
               pi_{i-1} with reference pi_{i-1}, loop.iteration_epochs; then evaluate pi_i
    report     RUN_DIR/report.md + plots/

Tracking (`run.loggers`, `rayalign.tracking`): the loop is one tracker run of its per-iteration records and
the report's plots, and each iteration's update one more (`NAME/iter-N/train`), in the same group.

Every stage writes its artifacts atomically, its completion marker last; a stage whose marker exists is
skipped (and logged as such), so `--resume` after a kill anywhere redoes no finished work (training resumes
from its own checkpoints) and, with the HF backend, ends exactly where an uninterrupted run ends. This file
reads like the script it is; the stages are in `generate`, `judge`, `train`, `evaluate`, and `stages` holds
what the loop shares with the one-stage commands (`rayalign generate|judge|eval`). With `run.storage` every
stage also publishes its outputs there, marker last, and `--resume` first mirrors storage into run.dir
(`rayalign.storage`), so the stages may run on nodes that share no disk.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rayalign.config import Config, ConfigError
from rayalign.io import atomic_write_text
from rayalign.metrics_log import read_jsonl
from rayalign.stage_storage import StageStorage


def _log(message: str) -> None:
    print(f"rayalign run: {message}", flush=True)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


@dataclasses.dataclass
class Plan:
    storage: StageStorage  # run.storage at the stage boundaries; does nothing without it
    sft_path: str
    seed_pairs: str
    prompt_sets: list[list[str]]
    eval_prompts: list[str]
    generators: object = None  # generate.persistent: the run's `rayalign.generator_pool.GeneratorPool`
    judges: object = None  # judge.persistent: the run's `rayalign.judge_pool.JudgePool`

    @property
    def pools(self) -> tuple:
        """The run's long-lived hosts (`rayalign.host_pool`) that take each new policy's weights."""
        return tuple(pool for pool in (self.generators, self.judges) if pool is not None)


def setup(config: Config, run_dir: Path) -> Plan:
    """pi_SFT, the seed pairs and the prompt sets; built for the embedded task when not given."""
    from rayalign.models import LoadOptions
    from rayalign.stages import plan_prompts
    from rayalign.tasks import sentiment
    from rayalign.templating import check_prompts_template

    data = run_dir / "data"
    if config.loop.task == "none" and not (config.model.policy and config.data.train_file and config.data.prompts_file):
        raise ConfigError("loop.task: with loop.task=none set model.policy, data.train_file and data.prompts_file")
    storage = StageStorage(config)
    sft_path = config.model.policy or str(build_task_sft(config, run_dir, storage))
    seed_pairs = config.data.train_file
    if not seed_pairs:
        seed_pairs = str(data / "seed_pairs.jsonl")
        if not Path(seed_pairs).exists():
            _write_jsonl(Path(seed_pairs), sentiment.gold_pairs(config.loop.seed_pairs, seed=config.data.seed))
            storage.commit(seed_pairs)
    plan = Plan(storage, sft_path, seed_pairs, *plan_prompts(config))
    if config.generate.persistent:
        from rayalign.generator_pool import GeneratorPool

        plan.generators = GeneratorPool(config.generate, LoadOptions.of(config.model), log=_log)
    if config.judge.persistent:
        from rayalign.judge_pool import JudgePool

        plan.judges = JudgePool(config, log=_log)
    check_prompts_template([p for prompts in plan.prompt_sets for p in prompts] + plan.eval_prompts, sft_path,
                           source=config.data.prompts_file, load=LoadOptions.of(config.model))
    return plan


def build_task_sft(config: Config, run_dir: Path, storage: StageStorage) -> Path:
    from rayalign.io import atomic_directory
    from rayalign.models import LoadOptions
    from rayalign.sft import run_sft
    from rayalign.tasks.sentiment import sft_examples
    from rayalign.tiny import make_tiny_model

    out = run_dir / "sft"
    if (out / "config.json").exists():
        _log(f"setup: pi_SFT found in {out}, skipped")
        return out
    examples = sft_examples(config.loop.sft_examples, seed=config.data.seed)
    corpus = _write_jsonl(run_dir / "data" / "corpus.jsonl", [{"text": p + r} for p, r in examples])
    tiny = run_dir / "tiny-model"
    if not (tiny / "config.json").exists():
        with atomic_directory(tiny) as tmp:  # a kill mid-save must not leave a model that looks complete
            make_tiny_model(tmp, corpus=corpus, seed=config.train.seed)
        storage.commit(corpus, tiny)
    _log(f"SFT of the tiny model on {len(examples)} task examples")
    sft = run_sft(str(tiny), examples, out, epochs=config.loop.sft_epochs, lr=config.loop.sft_lr,
                  seed=config.train.seed, log=_log, load=LoadOptions.of(config.model))
    storage.commit(sft)  # run.storage: actors on other nodes load pi_SFT from there
    return sft


def train_iteration(config: Config, run_dir: Path, *, policy: str, reference: str, data: str, epochs: int,
                    iteration: int, storage: StageStorage, pools: tuple = ()) -> str:
    """Run the Ray Train stage into `run_dir` (resuming its checkpoints); returns the final model path."""
    from rayalign.judge import training_data
    from rayalign.stage_inputs import StageInputs
    from rayalign.tracking import TrackingSettings
    from rayalign.train import run_train

    final = run_dir / "final"
    if final.exists():  # written atomically by the last step: its presence means the stage finished
        _log(f"iteration {iteration}: training found in {final}, skipped")
        return str(final)
    _log(f"iteration {iteration}: training {policy} -> {final}")
    run_dir.mkdir(parents=True, exist_ok=True)
    # loop.rewards=gold relabels the judged samples; exo_rw/dpo_rw train on all K (DPO in iteration 0)
    loss_type, data = training_data(config, data, iteration, tokenizer_path=policy)  # policy: it judged `data`
    location, store = storage.training(run_dir)  # run.storage: outputs go to STORAGE/<its run dir>
    # Self-refinement de-noises self-judged labels: iteration 0 trains on gold labels without it.
    refine = config.spa.refine and iteration > 0
    # Iteration 0 trains on the user's seed pairs when given: their data.split / data.subset apply.
    user_data = {"split": config.data.split, "subset": config.data.subset} if data == config.data.train_file else {}
    reuse = iteration > 0 and reference == policy and judge_logps_reusable(config)
    # SamS: the scheduler carries on from the stage that trained this iteration's policy (its final/)
    carried = policy if config.sams.enabled and iteration > 0 else None
    inputs = StageInputs(policy=policy, reference=reference, train_file=data, epochs=epochs,
                         spa_mix=config.spa.mix_for(iteration) if refine else None, loss_type=loss_type,
                         reference_in_data=reuse, sams_state=carried, **user_data)
    stage = dataclasses.replace(  # the user's settings, run in the stage's own directory
        config, run=dataclasses.replace(config.run, dir=str(run_dir), storage=location))
    tracking = TrackingSettings.resolve(config, config.run.dir).stage(f"iter-{iteration}/train", run_dir)
    # a non-zero exit: run_train printed why; the CLI prints one line
    from rayalign.host_pool import push_target

    push = push_target(str(final), *pools)  # generate/judge.persistent: the new weights to them in memory
    if run_train(stage, resume=True, storage=store, inputs=inputs, tracking=tracking, push_weights=push) != 0:
        from rayalign.errors import StageFailed

        raise StageFailed("train", f"iteration {iteration}: training in {run_dir} failed (the error is above); "
                          "fix the cause and rerun with --resume")
    return str(final)


def judge_logps_reusable(config: Config) -> bool:
    """Whether training may take its reference log-probs from the judge's pass (iterations >= 1, whose
    reference pi_{i-1} judged those very samples, on the same tokenization and dtype): only when they are the
    quantity the scoring pass would compute, i.e. at logit temperature 1 and without MallowsPO's reference
    entropies, and ref.reuse_judge (default true) allows it."""
    from rayalign.loss_registry import needs_dispersion

    return config.ref.reuse_judge and config.loss.logit_temperature == 1.0 and not needs_dispersion(config.loss)


def sample_model(config: Config, run_dir: Path, plan: Plan, *, model: str, name: str,
                 it_dir: Path | None = None, prompts: list[str] = (), iteration: int = 0) -> dict | None:
    """One Ray Data pass with `model`: Generator actors -> Judge actors (model vs pi_SFT).

    The pass covers the evaluation prompts (-> eval/<name>.parquet) and, for a training iteration, that
    iteration's prompts (-> it_dir/samples.parquet and judged.parquet): the judge of iteration i and the
    evaluation of pi_{i-1} need the same two models, so they share the actors. Returns the judge counts.
    """
    import pandas as pd

    from rayalign.generate import write_samples
    from rayalign.judge import write_judged
    from rayalign.stage_timing import pass_file, pass_seconds, stage_line
    from rayalign.stages import EVAL_PROMPT_ID, eval_frame, iteration_frame, judged_pass, write_eval

    eval_path = run_dir / "eval" / f"{name}.parquet"
    # A pass is one unit, skipped only when its last write exists and otherwise redone whole: a partial
    # redo would batch prompts differently in the Judge, and padding moves log-probs in their last bits.
    marker = it_dir / "judge_counts.json" if it_dir else eval_path
    if marker.exists() and eval_path.exists():
        _log(f"{f'iteration {iteration}' if it_dir else f'evaluation of {name}'}: found "
             f"{marker.relative_to(run_dir)}, skipped")
        return json.loads(marker.read_text()) if it_dir else None
    frames = [iteration_frame(prompts, iteration)] if it_dir else []
    work = [f"iteration {iteration}: generating and judging {len(prompts)} prompts"] if it_dir else []
    frames.append(eval_frame(plan.eval_prompts))
    work.append(f"evaluating {name} on {len(plan.eval_prompts)} held-out prompts")
    _log(f"{'; '.join(work)} with {model}")  # the resume test waits for "iteration 2: generating"
    tag = model
    model, sft_path = plan.storage.inputs(model, plan.sft_path)  # run.storage: actors on any node read them
    began = time.perf_counter()
    from rayalign.sams_score import SCORE_COLUMN, scores_pairs

    sams = EVAL_PROMPT_ID if it_dir and scores_pairs(config) else None  # the bandit scores the training pairs
    rows = judged_pass(config, pd.concat(frames, ignore_index=True), model=model, sft_path=sft_path,
                       pool=plan.generators, judges=plan.judges, tag=tag, sams_below_id=sams)
    is_eval = rows["prompt_id"] >= EVAL_PROMPT_ID
    seconds = pass_seconds(rows, is_eval, time.perf_counter() - began)
    _log(f"{f'iteration {iteration}' if it_dir else f'evaluation of {name}'}: pass {stage_line(seconds)}")
    timing = atomic_write_text(pass_file(run_dir, name), json.dumps(seconds) + "\n")
    write_eval(rows[is_eval].drop(columns=[SCORE_COLUMN], errors="ignore"), config, eval_path)
    if it_dir is None:
        plan.storage.commit(timing, eval_path)
        return None
    write_samples(rows[~is_eval], it_dir / "samples.parquet")
    counts = write_judged(rows[~is_eval], it_dir / "judged.parquet")
    atomic_write_text(marker, json.dumps(counts) + "\n")  # the pass's completion marker, written last
    plan.storage.commit(timing, eval_path, it_dir / "samples.parquet", it_dir / "judged.parquet", marker)  # last
    return counts


def iteration_record(config: Config, run_dir: Path, iteration: int, *, name: str, previous: str, pairs: int,
                     seconds: float, judged_path: Path | None) -> dict:
    """The per-iteration record of metrics.jsonl, from the stored evaluation samples."""
    import pandas as pd

    from rayalign.evaluate import compare, compare_rm, gold_agreement, judge_accuracy, kl_to_sft
    from rayalign.reward_judge import EVAL_REWARDS
    from rayalign.sams_score import score_summary
    from rayalign.stage_timing import read_iteration_seconds
    from rayalign.tasks.sentiment import gold_reward

    def rows(model_name: str):
        return pd.read_parquet(run_dir / "eval" / f"{model_name}.parquet")

    record = {"iteration": iteration, "pairs": pairs, "kl_to_ref": kl_to_sft(rows(name))}
    judged = pd.read_parquet(judged_path) if judged_path else None
    if config.loop.task == "sentiment":
        record.update(compare(rows(name), {"sft": rows("sft"), "prev": rows(previous)}))
        record["judge_accuracy"] = judge_accuracy(judged, gold_reward) if judged is not None else None
    if judged is not None:  # the bandit's scores of the pairs (sams.enabled): vs the gold label when known
        agreement = gold_agreement(judged, gold_reward) if config.loop.task == "sentiment" else None
        record.update(score_summary(judged, agreement))
    if config.eval.reward_model:
        frames = {"policy": rows(name), "sft": rows("sft"), "prev": rows(previous)}
        if all(EVAL_REWARDS in f for f in frames.values()):
            record.update(compare_rm(frames.pop("policy"), frames))
        else:  # samples evaluated before eval.reward_model was set (a resume with --accept-changes)
            _log(f"iteration {iteration}: no eval.reward_model scores in the stored evaluation samples of "
                 f"{name}, sft or {previous}: rm/* metrics left out")
    train_steps = read_jsonl(run_dir / f"iter-{iteration}" / "train" / "metrics.jsonl")
    record.update(train_loss=train_steps[-1]["loss"], train_margin=train_steps[-1]["rewards/margins"],
                  seconds=round(seconds, 1), **read_iteration_seconds(run_dir, iteration))
    return record


def _append_metrics(run_dir: Path, record: dict) -> None:
    path = run_dir / "metrics.jsonl"
    kept = [r for r in (read_jsonl(path) if path.exists() else []) if r["iteration"] != record["iteration"]]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in [*kept, record]))


def _stage_seconds(storage: StageStorage, run_dir: Path, iteration: int, started: float) -> float:
    """Wall time of an iteration, kept across a resume in iter-N/seconds."""
    path = run_dir / f"iter-{iteration}" / "seconds"
    if not path.exists():
        atomic_write_text(path, f"{time.perf_counter() - started:.1f}\n")
        storage.commit(path)
    return float(path.read_text())


def run_loop(config: Config, *, resume: bool = False) -> int:
    """The whole iterative run; returns the exit code."""
    from rayalign.report import write_report
    from rayalign.storage_resume import start_run
    from rayalign.train import ensure_ray

    started, run_dir = time.perf_counter(), Path(config.run.dir)
    if (run_dir / "data").exists() and not resume:
        raise ConfigError(f"run.dir: {run_dir} already holds a run; pass --resume to continue it")
    start_run(config, resume=resume)  # run.storage: a stored run needs --resume, which mirrors it into run_dir
    ensure_ray()
    plan = setup(config, run_dir)
    trackers = open_trackers(config, run_dir)
    _log(f"setup done after {time.perf_counter() - started:.0f} s: pi_SFT {plan.sft_path}")
    sample_model(config, run_dir, plan, model=plan.sft_path, name="sft")
    stage_start = time.perf_counter()
    policy = train_iteration(config, run_dir / "iter-0" / "train", policy=plan.sft_path, reference=plan.sft_path,
                             data=plan.seed_pairs, epochs=config.loop.seed_epochs, iteration=0, storage=plan.storage,
                             pools=plan.pools)
    pending = {"iteration": 0, "previous": "sft", "pairs": _count_rows(plan.seed_pairs, config), "judged_path": None,
               "seconds": _stage_seconds(plan.storage, run_dir, 0, stage_start)}
    for i, prompts in enumerate(plan.prompt_sets, start=1):
        stage_start, it_dir = time.perf_counter(), run_dir / f"iter-{i}"
        counts = sample_model(config, run_dir, plan, model=policy, name=f"iter-{i - 1}", it_dir=it_dir,
                              prompts=prompts, iteration=i)
        _finish_record(config, run_dir, plan.storage, trackers, name=f"iter-{i - 1}", **pending)
        _log(f"iteration {i}: judged {counts['prompts']} prompts -> {counts['pairs']} pairs "
             f"(dropped: {counts['dropped_empty']} empty, {counts['dropped_identical']} identical, "
             f"{counts['dropped_tie']} ties)")
        policy = train_iteration(config, it_dir / "train", policy=policy, reference=policy,
                                 data=str(it_dir / "judged.parquet"), epochs=config.loop.iteration_epochs,
                                 iteration=i, storage=plan.storage, pools=plan.pools)
        pending = {"iteration": i, "previous": f"iter-{i - 1}", "pairs": counts["pairs"], "judged_path":
                   it_dir / "judged.parquet", "seconds": _stage_seconds(plan.storage, run_dir, i, stage_start)}
    sample_model(config, run_dir, plan, model=policy, name=f"iter-{pending['iteration']}")
    _finish_record(config, run_dir, plan.storage, trackers, name=f"iter-{pending['iteration']}", **pending)
    for pool in plan.pools:
        _log(f"{pool.kind}: {pool.engines_started} engine(s) started for the run; "
             f"{pool.loaded_from_files} weight load(s) from files, the rest pushed in memory")
        pool.shutdown()
    report = write_report(run_dir)
    plan.storage.commit(*[p for p in (run_dir / "plots", report) if p.exists()])
    trackers.log_images(sorted((run_dir / "plots").glob("*.png")), step=pending["iteration"])
    trackers.close()
    _log(f"done in {time.perf_counter() - started:.0f} s; report {report}; final model {policy}")
    return 0


def open_trackers(config: Config, run_dir: Path):
    """The loop's tracker run (`rayalign.tracking`). A resumed loop recomputes every iteration's record from
    the stored samples (`_finish_record`), so a new tracker run gets them all again, in order; TensorBoard
    hides the earlier events of those iterations."""
    from rayalign.config_loader import config_to_dict
    from rayalign.tracking import Trackers, TrackingSettings

    resumed = (run_dir / "metrics.jsonl").exists()
    return Trackers(TrackingSettings.resolve(config, run_dir), tb_dir=run_dir / "tb", config=config_to_dict(config),
                    purge_step=0 if resumed else None)


def _finish_record(config: Config, run_dir: Path, storage: StageStorage, trackers, *, name: str, iteration: int,
                   previous: str, pairs: int, judged_path: Path | None, seconds: float) -> None:
    record = iteration_record(config, run_dir, iteration, name=name, previous=previous, pairs=pairs,
                              seconds=seconds, judged_path=judged_path)
    _append_metrics(run_dir, record)
    storage.commit(run_dir / "metrics.jsonl")
    trackers.log(record, step=iteration)
    _log(f"iteration {iteration}: {_summary(record)}")
    from rayalign.stage_timing import stage_line

    times = {k: v for k, v in record.items() if k.startswith("time/")}
    _log(f"iteration {iteration}: {record['seconds']:.0f} s; {stage_line(times)}")


def _count_rows(path: str, config: Config) -> int:
    from rayalign.data import Selection, load_rows

    user_data = path == config.data.train_file  # the user's seed pairs: their split and subset
    select = Selection(config.data.split, config.data.subset) if user_data else Selection()
    return len(load_rows(path, select=select).rows)


def _summary(record: dict) -> str:
    keys = ("win_rate_vs_sft", "win_rate_vs_prev", "gold_reward_mean", "rm/win_rate_vs_sft", "rm/win_rate_vs_prev",
            "rm/reward_mean", "judge_accuracy", "sams/score_mean", "sams/score_gap", "kl_to_ref")
    return ", ".join(f"{k} {record[k]:.3f}" for k in keys if record.get(k) is not None)
