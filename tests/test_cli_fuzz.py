"""A fuzz test over the CLI: random and truncated YAML, random overrides, random and truncated data rows.

Every case either works (exit 0) or exits 2 with one line on stderr and no traceback, and nothing under an
existing run directory changes (its tree is hashed before and after all cases). The cases are seeded
(FUZZ_SEED) and run in-process through `rayalign.cli.main`, plus a few as a user runs them (subprocesses).
Nothing here starts Ray: commands aimed at the existing run are refused before any work, and `train` on
fresh run dirs meets an unreachable RAY_ADDRESS (refused in a fraction of a second here) right after it
validated the config, the model and the data.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayalign import ray_session
from rayalign.cli import main
from rayalign.config_loader import load_config, valid_keys
from rayalign.run_dir import prepare_run_dir
from tests.test_run_dir import tree_hash

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
FUZZ_SEED = int(os.environ.get("RAYALIGN_FUZZ_SEED", "12"))  # other seeds: explore
KEYS = [k for k in valid_keys() if k != "run.dir"]
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
WORDS = ["dpo", "ipo", "gdpo", "hf", "auto", "none", "null", "true", "no", "cosine", "asha", "grid", "[1, 2",
         "{a: 1}", "[]", "{}", "1e-6", "-1", "0", "nan", "inf", "1e400", "x" * 300, "é", "a,b", "[[1]]", "~", ""]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return rng.randint(-10**6, 10**6)
    if kind == 1:
        return rng.choice([0.0, -1.5, 1e-8, 3.7, float("nan"), float("inf"), 1e308])
    if kind == 2:
        return rng.choice(WORDS)
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return "".join(rng.choice("ab:{}[],#&*!|>'\"\n\t -") for _ in range(rng.randrange(12)))
    if kind == 5:
        return rng.randint(0, 3)
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(random_value(rng, depth + 1)): random_value(rng, depth + 1) for _ in range(rng.randrange(3))}


def mutated_key(rng: random.Random) -> str:
    key = rng.choice(KEYS)
    choice = rng.randrange(6)
    if choice == 0:
        i = rng.randrange(len(key))
        return key[:i] + key[i + 1:]
    if choice == 1:
        return key.split(".")[0]
    if choice == 2:
        return key + ".x"
    if choice == 3:
        return rng.choice(["", ".", "loss.", ".beta", "a.b.c", "LOSS.BETA"])
    return key


def random_override(rng: random.Random) -> str:
    key = rng.choice(KEYS) if rng.random() < 0.7 else mutated_key(rng)
    value = random_value(rng)
    text = value if isinstance(value, str) else json.dumps(value) if rng.random() < 0.5 else str(value)
    return f"{key}={text}".replace("\n", " ")


def random_yaml(rng: random.Random, path: Path) -> Path:
    tree: dict = {}
    for _ in range(rng.randrange(5)):
        section = rng.choice(SECTIONS) if rng.random() < 0.8 else str(random_value(rng))
        if rng.random() < 0.1:
            tree[section] = random_value(rng)
            continue
        body = tree[section] = tree[section] if isinstance(tree.get(section), dict) else {}
        for _ in range(rng.randrange(4)):
            key = rng.choice(KEYS) if rng.random() < 0.8 else mutated_key(rng)
            body[key.split(".")[-1]] = random_value(rng)
    text = yaml.safe_dump(tree, allow_unicode=True) if rng.random() < 0.7 else Path(QUICKSTART).read_text()
    if rng.random() < 0.5:
        text = text[:rng.randrange(len(text) + 1)]
    if rng.random() < 0.15:
        text = rng.choice(["\t- [", "a: [1, 2", "{", "- 1\n- 2\n", ": :", "%YAML 9\n---", "&a [*a]", "\x00"])
    path.write_bytes(text.encode("utf-8", "surrogatepass") if rng.random() < 0.95 else b"\xff\xfe\x00loss")
    return path


GOOD_ROWS = [
    {"prompt": "Hi", "chosen": " good", "rejected": " bad"},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: yes", "rejected": "\n\nHuman: Hi\n\nAssistant: no"},
    {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "a"}],
     "rejected": [{"role": "assistant", "content": "b"}]},
    {"prompt": "Hi", "completions": [" a", " b"], "rewards": [1.0, 0.0]},
    {"prompt": "Hi"},
]


def random_row(rng: random.Random, base: dict) -> dict:
    row = json.loads(json.dumps(base))
    for _ in range(rng.randrange(3)):
        action = rng.randrange(4)
        key = rng.choice(sorted(row)) if row else "prompt"
        if action == 0:
            row.pop(key, None)
        elif action == 1:
            row[key] = random_value(rng)
        elif action == 2:
            row[rng.choice(["score_chosen", "id", "target", "belief", "extra"])] = random_value(rng)
    return row


def random_jsonl(rng: random.Random, path: Path) -> Path:
    base = rng.choice(GOOD_ROWS)  # one format per file, so that many files are valid or nearly
    lines = [json.dumps(random_row(rng, base) if rng.random() < 0.15 else base, allow_nan=True)
             for _ in range(rng.randrange(1, 8))]
    data = "\n".join(lines) + "\n"
    if rng.random() < 0.4:
        data = data[:rng.randrange(len(data) + 1)]  # a torn last row
    if rng.random() < 0.1:
        data = rng.choice(["", "\n\n", "[1, 2]\n", "null\n", "{\"prompt\": \"\\ud800\"}\n", "\ufeff{}\n"])
    path.write_text(data, encoding="utf-8", errors="surrogatepass")
    return path


def check_outcome(code: int, err: str, case: list[str], *, out: str = "", report_on_stdout: bool = False) -> None:
    where = f"case {case}: exit {code}\nstderr: {err[-2000:]}\nstdout: {out[-1000:]}"
    assert code in (0, 2), where
    assert "Traceback" not in err and "Traceback" not in out, where
    lines = err.strip().splitlines()
    if code == 2 and not report_on_stdout:
        assert len(lines) == 1, where
    assert len(lines) <= 1, where


@pytest.fixture
def existing(tmp_path):
    """A run dir holding a loop run, a training's checkpoint and a sweep: every command must refuse it."""
    run_dir = tmp_path / "existing"
    prepare_run_dir(load_config(QUICKSTART, [f"run.dir={run_dir}"]))
    for marker in ("data/seed_pairs.jsonl", "checkpoints/step-2/trainer_state.json", "metrics.jsonl"):
        (run_dir / marker).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / marker).write_text('{"step": 2}\n')
    (run_dir / "tune").mkdir()
    (run_dir / "tune" / "sweep.yaml").write_text((run_dir / "config.yaml").read_text())
    return run_dir


def run_case(capsys, argv: list[str], **kwargs) -> None:
    code = main(argv)
    captured = capsys.readouterr()
    check_outcome(code, captured.err, argv, out=captured.out, **kwargs)


def test_cli_fuzz(tmp_path, capsys, monkeypatch, existing, tiny_model_dir):
    rng = random.Random(FUZZ_SEED)
    before = tree_hash(existing)
    monkeypatch.chdir(tmp_path)  # relative paths from random overrides (run.storage=x, ...) land here
    dead = "127.0.0.1:1"  # port 1: nothing listens, so a train that got this far is refused, Ray never starts
    monkeypatch.setenv("RAY_ADDRESS", dead)
    monkeypatch.setattr(ray_session, "WAIT_S", 0.2)
    for i in range(150):  # configs: random and truncated YAML, random overrides
        overrides = [random_override(rng) for _ in range(rng.randrange(4))]
        config = [str(random_yaml(rng, tmp_path / f"c{i}.yaml"))] if rng.random() < 0.6 else []
        run_case(capsys, ["show", *config, *overrides])
    for i in range(60):  # the existing run: refused or a config error, and nothing in it changes
        command = rng.choice(["run", "train", "tune", "generate", "judge", "eval"])
        resume = ["--resume"] if command in ("run", "train", "tune") and rng.random() < 0.5 else []
        overrides = [random_override(rng) for _ in range(rng.randrange(3))]
        changed = [f"train.seed={rng.randint(1, 10**6)}"] if resume else []  # --resume must see a change
        config = [str(random_yaml(rng, tmp_path / f"e{i}.yaml"))] if rng.random() < 0.3 else [QUICKSTART]
        run_case(capsys, [command, *config, *overrides, *changed, f"run.dir={existing}", *resume])
    for i in range(40):  # data rows: `data check`, and `train` validating them (fresh run dirs) up to Ray
        data = random_jsonl(rng, tmp_path / f"d{i}.jsonl")
        run_case(capsys, ["data", "check", str(data)], report_on_stdout=True)
        overrides = [random_override(rng)] if rng.random() < 0.3 else []
        argv = ["train", f"data.train_file={data}", f"model.policy={tiny_model_dir}", *overrides,
                f"run.dir={tmp_path / f'fresh{i}'}"]
        code = main(argv)
        err = capsys.readouterr().err
        check_outcome(code, err, argv)
        assert code == 2, f"case {argv}: Ray must not start here\n{err}"
    assert tree_hash(existing) == before


def test_cli_fuzz_as_a_user_runs_it(tmp_path, existing):
    rng = random.Random(FUZZ_SEED + 1)
    before = tree_hash(existing)
    cases = [["show", str(random_yaml(rng, tmp_path / "a.yaml"))],
             ["data", "check", str(random_jsonl(rng, tmp_path / "a.jsonl"))],
             ["run", QUICKSTART, random_override(rng), f"run.dir={existing}"],
             ["train", QUICKSTART, "loss.beta=0.5", f"run.dir={existing}", "--resume"]]
    (tmp_path / "torn.yaml").write_text(Path(QUICKSTART).read_text()[:333])
    cases.append(["show", str(tmp_path / "torn.yaml")])
    for argv in cases:
        result = subprocess.run([sys.executable, "-m", "rayalign.cli", *argv], capture_output=True, text=True,
                                cwd=REPO, timeout=120, env={**_env(), "RAY_ADDRESS": "127.0.0.1:1"})
        check_outcome(result.returncode, result.stderr, argv, out=result.stdout,
                      report_on_stdout=argv[0] == "data")
    assert tree_hash(existing) == before
    assert math.isfinite(load_config(existing / "config.yaml").loss.beta)


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
