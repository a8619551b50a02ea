"""The `rayalign` command line: one entry point with subcommands.

    rayalign show CONFIG [key=value ...]       print the fully resolved config as YAML
    rayalign run CONFIG [key=value ...]        the iterative SPA loop (see `rayalign.loop`) [--resume]
    rayalign train CONFIG [key=value ...]      Ray Train update on preference pairs [--resume]
    rayalign tune CONFIG [key=value ...]       Ray Tune sweep over tune.space, one train run per trial [--resume]
    rayalign generate CONFIG [key=value ...]   one stage of the loop: sample the prompts [--iteration N]
    rayalign judge CONFIG [key=value ...]      one stage: SPA self-judging of a samples file [--samples P]
    rayalign eval CONFIG [key=value ...]       one stage: model.policy vs a baseline [--baseline P]
    rayalign data check FILE [--tokenizer P]   detect, validate and describe a data file
    rayalign make-tiny-model OUT_DIR [...]     build a tiny local Llama + BPE tokenizer
    rayalign fit-reward-model OUT_DIR [...]    fit a tiny reward model on the sentiment task's gold pairs

Each handler imports its stage lazily, so `rayalign show` never pays for torch or Ray. Whatever ends a
command is printed as one line (no traceback) by `main`, with the exit codes of `rayalign.errors`: 2 for
a user mistake (config, data, model path, run directory, Ray address), 1 for a runtime failure (naming the
stage and the original exception that a Ray actor or worker raised), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

from rayalign.errors import report, unwrap


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="YAML file of overrides (optional)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides parsed by the field's type, e.g. loss.beta=0.05 run.dir=runs/x")


def _split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    # `rayalign show loss.beta=0.1` has no CONFIG: argparse puts the first override in `config`.
    if args.config is not None and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _cmd_show(args: argparse.Namespace) -> int:
    from rayalign.config_loader import dump_config, load_config

    path, overrides = _split_config_and_overrides(args)
    sys.stdout.write(dump_config(load_config(path, overrides)))
    return 0


def _prepared(args: argparse.Namespace):
    """The resolved config, once every check passed and run.dir holds its config.yaml (`rayalign.run_dir`)."""
    from rayalign.config_loader import load_config
    from rayalign.run_dir import prepare_run_dir

    path, overrides = _split_config_and_overrides(args)
    return prepare_run_dir(load_config(path, overrides), command=args.command,
                           resume=getattr(args, "resume", False), accept_changes=getattr(args, "accept_changes", False))


def _cmd_run(args: argparse.Namespace) -> int:
    from rayalign.loop import run_loop

    return run_loop(_prepared(args), resume=args.resume)


def _cmd_train(args: argparse.Namespace) -> int:
    from rayalign.train import run_train

    return run_train(_prepared(args), resume=args.resume)


def _cmd_tune(args: argparse.Namespace) -> int:
    from rayalign.tune import run_tune

    return run_tune(_prepared(args), resume=args.resume)


def _cmd_stage(args: argparse.Namespace) -> int:
    from rayalign import stages

    config = _prepared(args)
    if args.command == "generate":
        return stages.run_generate(config, iteration=args.iteration)
    if args.command == "judge":
        return stages.run_judge(config, samples=args.samples)
    return stages.run_eval(config, baseline=args.baseline)


def _add_stage_commands(commands) -> None:
    generate = commands.add_parser("generate", help="one loop stage: sample completions of the prompts with "
                                   "model.policy -> RUN_DIR/samples.parquet")
    generate.add_argument("--iteration", type=int, default=None,
                          help="only the loop's prompt set of this iteration (default: all iterations' prompts)")
    judge = commands.add_parser("judge", help="one loop stage: SPA self-judging, model.policy vs model.reference "
                                "-> RUN_DIR/judged.parquet")
    judge.add_argument("--samples", default=None, help="samples Parquet to judge (default RUN_DIR/samples.parquet)")
    evaluate = commands.add_parser("eval", help="one loop stage: model.policy vs a baseline on the held-out "
                                   "prompts -> RUN_DIR/eval/summary.json")
    evaluate.add_argument("--baseline", default=None, help="model to compare with (default model.reference)")
    for stage in (generate, judge, evaluate):
        _add_config_arguments(stage)
        stage.set_defaults(handler=_cmd_stage)


def _cmd_data_check(args: argparse.Namespace) -> int:
    from rayalign.data.check import run_data_check

    # sys.stdout now: its default argument is whatever sys.stdout was when the module was first imported
    return run_data_check(args.file, tokenizer=args.tokenizer, fmt=args.format, split=args.split,
                          subset=args.subset, out=sys.stdout)


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from rayalign.tiny import run_make_tiny_model

    if args.arch or args.config_only:  # a real architecture's shape (rayalign.arch, which builds on rayalign.tiny)
        from rayalign.arch import run_make_arch_model

        return run_make_arch_model(args)

    return run_make_tiny_model(args)


def _cmd_fit_reward_model(args: argparse.Namespace) -> int:
    from rayalign.tasks.reward_model import run_fit_reward_model

    return run_fit_reward_model(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayalign", description="Iterative LLM preference alignment on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    show = commands.add_parser("show", help="print the fully resolved config as YAML")
    _add_config_arguments(show)
    show.set_defaults(handler=_cmd_show)

    run = commands.add_parser("run", help="the iterative loop: SFT, DPO on seed pairs, then SPA iterations")
    _add_config_arguments(run)
    run.add_argument("--resume", action="store_true", help="skip finished stages of an interrupted run")
    run.set_defaults(handler=_cmd_run)

    train = commands.add_parser("train", help="train on preference pairs with Ray Train (DDP or DeepSpeed)")
    _add_config_arguments(train)
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    train.set_defaults(handler=_cmd_train)

    tune = commands.add_parser("tune", help="Ray Tune sweep over tune.space: each trial is a `train` run")
    _add_config_arguments(tune)
    tune.add_argument("--resume", action="store_true", help="continue a killed sweep; finished trials are kept")
    tune.set_defaults(handler=_cmd_tune)
    for resumable in (run, train):  # a sweep cannot change on --resume (Ray Tune restores its own state)
        resumable.add_argument("--accept-changes", action="store_true",
                               help="with --resume: continue with settings that differ from the run's config.yaml "
                               "(kept as config.N.yaml)")
    _add_stage_commands(commands)

    data = commands.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="detect, validate and describe a preference or prompt file")
    from rayalign.data.check import add_data_check_arguments

    add_data_check_arguments(check)
    check.set_defaults(handler=_cmd_data_check)

    tiny = commands.add_parser("make-tiny-model", help="build a tiny local Llama model and BPE tokenizer")
    from rayalign.tiny import add_make_tiny_model_arguments

    add_make_tiny_model_arguments(tiny)
    from rayalign.arch import add_arch_arguments

    add_arch_arguments(tiny)
    tiny.set_defaults(handler=_cmd_make_tiny_model)

    fit = commands.add_parser("fit-reward-model", help="fit a tiny reward model (sequence classifier) on the "
                              "sentiment task's gold pairs, for judge.reward_model / eval.reward_model")
    from rayalign.tasks.reward_model import add_fit_reward_model_arguments

    add_fit_reward_model_arguments(fit)
    fit.set_defaults(handler=_cmd_fit_reward_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling `overrides` at the first option (`run CONFIG --resume a=b`): take the rest.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001  (mapped to one line and an exit code)
        if os.environ.get("RAYALIGN_TRACEBACK") == "1" and not unwrap(exc).user_mistake:
            raise
        line, code = report(exc, args.command)
        print(line, file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
