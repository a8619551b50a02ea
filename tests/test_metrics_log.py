"""Torn `metrics.jsonl` files: a kill during an append must not make every `--resume` fail on parse.

A partial LAST line is dropped with one line on stderr (file, line number, what was dropped); a broken line
before the last is not a torn append and fails naming the file and the line. Covers the training log
(`MetricsLog`, rewritten on resume), the loop's per-iteration log and the Tune report's reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayalign.data.errors import DataValidationError
from rayalign.metrics_log import CorruptLogError, MetricsLog, read_jsonl


def _steps(n: int) -> str:
    return "".join(json.dumps({"step": s, "loss": 0.5, "rewards/accuracies": 1.0}) + "\n" for s in range(1, n + 1))


def test_resume_truncation_drops_a_torn_last_line_and_says_so(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text(_steps(3) + '{"step": 4, "lo')  # killed in the middle of the 4th append
    MetricsLog(tmp_path, enabled=True, total_steps=6, resume_step=2).close({"step": 2})
    assert [r["step"] for r in read_jsonl(log)] == [1, 2]
    assert log.read_text().endswith("\n")
    err = [line for line in capsys.readouterr().err.splitlines() if "partial last line" in line]
    assert len(err) == 1 and f"{log}:4:" in err[0] and '{"step": 4, "lo' in err[0]


def test_a_torn_line_after_the_resume_step_is_gone_and_appends_continue(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(_steps(2) + '{"st')
    metrics = MetricsLog(tmp_path, enabled=True, total_steps=4, resume_step=2)
    metrics.write({"step": 3, "loss": 0.4, "rewards/accuracies": 1.0})
    metrics.close({"step": 3})
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3]


def test_a_corrupt_line_in_the_middle_names_file_and_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = _steps(4).splitlines()
    lines[1] = "garbage"
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorruptLogError, match=rf"{log}:2: .*not valid JSON") as info:
        MetricsLog(tmp_path, enabled=True, total_steps=6, resume_step=3)
    assert isinstance(info.value, DataValidationError)  # the CLI prints it as one error, exit 2
    assert log.read_text() == "\n".join(lines) + "\n"  # nothing rewritten


def test_blank_lines_and_a_clean_file_read_as_is(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text(_steps(2) + "\n")
    assert [r["step"] for r in read_jsonl(log)] == [1, 2]
    assert capsys.readouterr().err == ""


def test_the_loop_and_tune_readers_tolerate_a_torn_last_line(tmp_path):
    from rayalign.loop import _append_metrics
    from rayalign.tune_report import read_curve

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "pairs": 3}) + "\n" + '{"iteration": 1, "pa')
    _append_metrics(run, {"iteration": 1, "pairs": 5})
    assert read_jsonl(run / "metrics.jsonl") == [{"iteration": 0, "pairs": 3}, {"iteration": 1, "pairs": 5}]

    trial = tmp_path / "trial"
    trial.mkdir()
    (trial / "metrics.jsonl").write_text(json.dumps({"step": 2, "eval/loss": 0.6}) + "\n" + '{"step": 4, "eval/l')
    assert read_curve(Path(trial), "eval/loss") == ((2, 0.6),)
