"""What went wrong, in one line, and the exit code: the CLI's error mapping (`rayalign.cli.main` uses it).

Exit codes:
    0    success
    1    a runtime failure: a stage raised (a Ray Data actor, a Ray Train worker, the loop), training
         diverged, trials failed. Fix the cause; `--resume` continues where the run stopped.
    2    a user mistake, found before work starts where possible: a config key or value, a data file or row,
         a model path or hub id, a run directory that already holds a run, an unreachable RAY_ADDRESS.
    130  interrupted (Ctrl-C).

Ray wraps what a stage raised: a Ray Data actor's exception arrives as `RayTaskError(UserCodeException)`
(raised in its constructor: `ActorDiedError`), whose original exception survives only as text, and a Ray
Train worker's as `WorkerGroupError` holding it per rank. `unwrap` follows those wrappers (and nothing
else: an exception raised `from` another is already the one the user should read) to the original type
and message, and names the stage it came from. RAYALIGN_TRACEBACK=1 re-raises runtime failures with
their traceback. Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import re

from rayalign.data.errors import DataValidationError

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
USER_ERRORS = ("ConfigError", "DataValidationError", "ModelNotFoundError")
# Ray Data actor classes -> the stage they belong to (`ray::MapWorker(MapBatches(Judge))` in Ray's text)
ACTOR_STAGES = {"Generator": "generate", "Judge": "judge", "PairEncoder": "prepare", "ReferenceScorer": "prepare"}
_CAUSED = "\n\nThe above exception was the direct cause of the following exception:"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class StageFailed(RuntimeError):
    """A stage of the loop failed after reporting why (e.g. `run_train` printed its error): stop the run."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


@dataclasses.dataclass(frozen=True)
class Failure:
    kind: str  # the original exception's class name ("" for StageFailed, whose message says it all)
    message: str
    stage: str | None

    @property
    def user_mistake(self) -> bool:
        return self.kind in USER_ERRORS

    def line(self) -> str:
        return f"{self.kind}: {self.message}" if self.kind else self.message


def _actor_stage(text: str) -> str | None:
    names = re.findall(r"MapBatches\((\w+)\)", text) + re.findall(r"ray::(\w+)", text)
    return next((ACTOR_STAGES[name] for name in names if name in ACTOR_STAGES), None)


def _remote_root(text: str, wrapped: bool) -> tuple[str, str] | None:
    """(type name, message) of the exception in a RayTaskError's text (Ray kept only the text).

    `wrapped`: the text ends with Ray Data's UserCodeException, raised from the UDF's exception; that one
    is the block before it. An exception's text follows the last indented line (the traceback's frames)."""
    text = _ANSI.sub("", text)
    block = text.rsplit(_CAUSED, 1)[0] if wrapped else text
    lines = block.strip().splitlines()
    frames = [i for i, line in enumerate(lines) if line[:1].isspace()]
    rest = lines[frames[-1] + 1:] if frames else lines[-1:]
    match = re.match(r"^([A-Za-z_][\w.]*): ?(.*)$", rest[0]) if rest else None
    if not match:
        return None
    return match.group(1).rsplit(".", 1)[-1], " ".join([match.group(2), *rest[1:]]).strip()


def unwrap(exc: BaseException) -> Failure:
    """The exception the user's code raised under Ray's wrappers, and the stage it came from."""
    stage, seen = None, set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StageFailed):
            return Failure("", str(exc), stage or exc.stage)
        failures = getattr(exc, "worker_failures", None)
        if failures:  # Ray Train's WorkerGroupError: the lowest rank's own exception
            stage, exc = stage or "train", failures[min(failures)]
            continue
        if getattr(exc, "controller_failure", None) is not None:
            stage, exc = stage or "train", exc.controller_failure
            continue
        if getattr(exc, "actor_init_failed", False):  # ActorDiedError: the actor's __init__ raised (text only)
            root = _remote_root(str(exc), wrapped=False)
            if root:
                return Failure(*root, stage or _actor_stage(str(exc)))
        if type(exc).__name__.startswith("RayTaskError"):
            stage = stage or _actor_stage(str(exc))
            cause = getattr(exc, "cause", None)
            if cause is None or type(cause).__name__ == "UserCodeException":
                root = _remote_root(str(exc), wrapped=cause is not None)
                if root:
                    return Failure(*root, stage)
            if cause is not None and cause is not exc:
                exc = cause
                continue
        if type(exc).__name__ == "UserCodeException" and exc.__cause__ is not None:
            exc = exc.__cause__
            continue
        break
    message = str(exc) if type(exc).__name__ != "KeyError" else repr(exc.args[0]) if exc.args else ""
    return Failure(type(exc).__name__, message, stage)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def failure_line(exc: BaseException) -> str:
    """`Type: message` of the original exception, on one line (for a stage's own error report)."""
    return _one_line(unwrap(exc).line())


def data_errors_line(exc: DataValidationError) -> str:
    """The first bad row as `FILE:ROW: FIELD: reason`, and how many more there are and where to see them all
    (`rayalign data check` prints one line per bad row)."""
    errors = getattr(exc, "errors", [])
    if not errors:
        return _one_line(str(exc))
    first, more = _one_line(str(errors[0])), len(errors) - 1
    return first if not more else f"{first} (and {more} more: `rayalign data check {errors[0].file}` lists them)"


def report(exc: BaseException, command: str) -> tuple[str, int]:
    """(the one line to print on stderr, the exit code) for an exception that ended `rayalign command`."""
    if isinstance(exc, KeyboardInterrupt):
        return "rayalign: interrupted", EXIT_INTERRUPTED
    if isinstance(exc, DataValidationError):  # raised here, not in an actor: its rows are at hand
        return data_errors_line(exc), EXIT_USAGE
    failure = unwrap(exc)
    code = EXIT_USAGE if failure.user_mistake else EXIT_FAILURE
    if failure.stage is None and failure.kind == "ConfigError":
        return f"rayalign: config error: {_one_line(failure.message)}", code
    if failure.stage is None and failure.kind == "DataValidationError":
        return _one_line(failure.message), code  # it names the file and row itself
    if failure.stage is None and failure.kind == "ModelNotFoundError":
        return f"rayalign: model not found: {_one_line(failure.message)}", code
    where = f"stage {failure.stage}" if failure.stage else command
    # StageFailed (no kind) follows the stage's own report: a traceback would add nothing
    hint = "" if code == EXIT_USAGE or not failure.kind else " (RAYALIGN_TRACEBACK=1 shows the traceback)"
    return f"rayalign: {where} failed: {_one_line(failure.line())}{hint}", code
