"""Shared pytest fixtures for the whole suite.

Sets HF_HUB_OFFLINE=1 at import so no test can ever download, and provides
- `tiny_model_dir`: one tiny random Llama model + tokenizer (rayalign.tiny defaults), built in about a second;
- `chat_model_dir`: the same with a ChatML chat template (`<|im_start|>`/`<|im_end|>` special tokens, eos
  `<|im_end|>`, as Qwen), for the conversational (templated) path;
- `shared_ray_head` (automatic): one `ray start --head` for the whole session, exported as RAY_ADDRESS, which
  every `rayalign` command the tests run and every in-process `init_ray()` joins in well under a second
  instead of starting its own local Ray (5-12 s each here). Tests that need a Ray of their own (process
  tags that find a killed run's daemons, their own clusters) drop RAY_ADDRESS from their environment;
  RAYALIGN_TEST_OWN_RAY=1 turns the shared head off for a whole session;
- `quickstart_run`: one uninterrupted, reduced `rayalign run configs/quickstart.yaml` (2 SPA iterations), the
  suite's most expensive step, run once per session and shared by the README test, the resume test and the
  stage-command test. Treat both as read-only.

`make test` runs the suite on one pytest-xdist worker per 2 cores from 4 cores up (`--dist loadgroup`), in one
process below that (the Makefile says why). `worker_group` keeps the tests that share an expensive fixture on one
worker, and each worker's torch (and every process it starts) gets its share of the cores (`worker_threads`);
the groups and lone tests are handed out longest first, by their measured seconds (`tests/scheduling.py`).
"""

import dataclasses
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
# The tokenizers library warns (and can deadlock) when a process forks after using its thread pool.
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def worker_threads(cpus: int, workers: int) -> int:
    """Threads per torch process when `workers` pytest workers share `cpus` cores: more would oversubscribe them
    (OpenMP's spinning threads then slow every worker down)."""
    return max(1, cpus // max(1, workers))


if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # before torch is imported; a value the user exported wins
    os.environ.setdefault("OMP_NUM_THREADS", str(worker_threads(os.cpu_count() or 1,
                                                                int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402

from rayalign.ray_session import local_start_settings  # noqa: E402
from tests import scheduling  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_REDUCED = ("loop.iterations=2", "loop.prompts_per_iteration=48", "eval.prompts=48",
                      "loop.seed_pairs=96", "loop.sft_examples=800")
# The smallest quickstart loop that still runs every stage once (SFT, seed DPO, generate, judge, train,
# eval): ~100 s on a quiet 2-core machine. For scale-out tests (jobs, autoscaling, shared storage) that
# check plumbing, not learning; append `run.dir=...` and test-specific keys.
MICRO_LOOP = ("loop.iterations=1", "loop.prompts_per_iteration=16", "eval.prompts=16", "loop.seed_pairs=32",
              "loop.seed_epochs=1", "loop.sft_examples=200", "loop.sft_epochs=1", "generate.num_samples=2",
              "generate.max_new_tokens=16")
# MICRO_LOOP without its self-judged iteration: SFT, seed DPO and two evaluation passes still put every
# stage (generation, judging, reference scoring, training) on the cluster; for plumbing tests (jobs, autoscaling).
SEED_ONLY_LOOP = tuple("loop.iterations=0" if o.startswith("loop.iterations=") else o for o in MICRO_LOOP)


EXPENSIVE_SESSION_FIXTURES = ("quickstart_run",)  # ~90 s: built once per worker that runs a test using it


def worker_group(item) -> str | None:
    """The pytest-xdist group of a test (`--dist loadgroup` runs a group on one worker), None to schedule it
    alone: the tests using an expensive session fixture form one group, and those of a module with a module-
    or class-scoped fixture another (its set-up would otherwise run on every worker)."""
    names = set(item.fixturenames)
    for name in EXPENSIVE_SESSION_FIXTURES:
        if name in names:
            return name
    definitions = getattr(item, "_fixtureinfo", None)
    scopes = {d.scope for defs in (definitions.name2fixturedefs.values() if definitions else ()) for d in defs}
    return item.module.__name__ if scopes & {"module", "class"} else None


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests run only where torch sees a CUDA device (benchmarks/gpu_check.sh); skipped elsewhere.
    Every test gets its `worker_group`, if any (read only by pytest-xdist's loadgroup); under pytest-xdist the
    costliest groups and tests come first (`tests/scheduling.py`)."""
    import torch

    for item in items:
        if group := worker_group(item):
            item.add_marker(pytest.mark.xdist_group(group))
    if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
        items[:] = scheduling.costliest_first(items, worker_group, scheduling.load_durations())
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    scheduling.record(report)


def pytest_sessionfinish(session):
    scheduling.store(session.config)


def wait_for(predicate, timeout: float, what: str, details=lambda: "", poll: float = 0.5):
    """Poll `predicate` until it returns something truthy (returned) or fail after `timeout` seconds,
    naming `what` and adding `details()` (e.g. a job's log) to the message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{details()}")


SHARED_HEAD_MARKER = "RAYALIGN_TEST_SHARED_HEAD"  # in the shared head's environment: its processes, for teardown
# Set for the session with the shared head (and so inherited by every command the tests start): auth off on both
# sides (a token in ~/.ray would otherwise switch the head to token mode), and Ray Train's preemption watcher off
# and the rest as `init_ray` sets it for a local Ray (Ray Train propagates RAY_TRAIN_* from each driver to its
# controller; the raylet reads its idle-worker limit at start).
SHARED_HEAD_ENV = {"RAY_AUTH_MODE": "disabled", **local_start_settings(os.cpu_count())}


@pytest.fixture(scope="session", autouse=True)
def shared_ray_head():
    """The session's Ray head (see the module docstring); yields its GCS address, or None when it is off (also
    where Ray is not installed: the GPU check's machine runs the `gpu` tests without it)."""
    import importlib.util

    if (os.environ.get("RAY_ADDRESS") or os.environ.get("RAYALIGN_TEST_OWN_RAY") == "1"
            or importlib.util.find_spec("ray") is None):
        yield os.environ.get("RAY_ADDRESS")
        return
    from tests.ray_heads import kill_marked, start_head

    tag = secrets.token_hex(4)
    temp_dir = Path(f"/tmp/ra-sh-{tag}")  # short: Ray's unix socket paths must stay < 108 characters
    saved = {key: os.environ.get(key) for key in ("RAY_ADDRESS", *SHARED_HEAD_ENV)}
    try:
        address, _ = start_head(temp_dir, {**os.environ, **SHARED_HEAD_ENV, SHARED_HEAD_MARKER: tag},
                                SHARED_HEAD_MARKER)
        os.environ.update(SHARED_HEAD_ENV, RAY_ADDRESS=address)
        yield address
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        survivors = kill_marked(SHARED_HEAD_MARKER, tag)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"processes of the shared Ray head survived: {survivors}"


def own_ray_env(**extra: str) -> dict[str, str]:
    """This process's environment without RAY_ADDRESS (plus `extra`): a command run with it starts its own
    local Ray, whose daemons and workers inherit the command's environment (process tags, thread counts)."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **extra}


@pytest.fixture(scope="module")
def in_process_ray():
    """For a module whose tests start Ray in the pytest process (`run_train` calls `ensure_ray`): shut it down
    after the module, so that later modules' commands start (or join) their own."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path to a Hugging Face directory holding the default tiny model; treat it as read-only."""
    from rayalign.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """Path to a tiny model with a ChatML chat template (`make-tiny-model --chat-template chatml`); read-only."""
    from rayalign.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("chat_model"), chat_template="chatml")


@dataclasses.dataclass(frozen=True)
class QuickstartRun:
    run_dir: Path
    overrides: tuple[str, ...]  # besides run.dir: rerun the same configuration elsewhere with these
    result: subprocess.CompletedProcess
    seconds: float


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> QuickstartRun:
    """The README's main command, reduced; tests assert on `result` (a failed run is not raised here)."""
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    command = [sys.executable, "-m", "rayalign.cli", "run", "configs/quickstart.yaml", f"run.dir={run_dir}",
               *QUICKSTART_REDUCED]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1200)
    return QuickstartRun(run_dir, QUICKSTART_REDUCED, result, time.perf_counter() - started)


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory) -> Path:
    """A tiny reward model fitted on the sentiment task's gold pairs (`rayalign fit-reward-model` defaults:
    ~7 s on one core, held-out pairwise accuracy ~0.95); treat it as read-only."""
    from rayalign.tasks.reward_model import fit_reward_model

    out = tmp_path_factory.mktemp("reward_model") / "rm"
    fit_reward_model(out)
    return out


def perturbed_copy(model_dir: str | Path, out: Path) -> dict:
    """`model_dir`'s model with every weight moved by 0.5 * N(0, 1) (seed 0), saved with its tokenizer to `out`
    (other weights than the tiny model's, the same tokenizer); returns the saved state dict (what a training
    stage pushes to the run's generators and judges)."""
    import torch

    from rayalign.models import load_model, load_tokenizer, save_weights

    model = load_model(str(model_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5 * torch.randn_like(param))
    state = save_weights(model, out)
    load_tokenizer(str(model_dir)).save_pretrained(out)
    return state
