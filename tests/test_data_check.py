"""`rayalign data check`: exit status and the exact `FILE:ROW: FIELD: message` lines for each bad input.

Calls `run_data_check` directly (and once `python -m rayalign.data.check`, to see no traceback leaks);
files are written to tmp_path. Tokenizer statistics are in test_data_chat.py.
"""

import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rayalign.data.check import run_data_check

REPO = Path(__file__).resolve().parents[1]
HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GOOD = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}


def check(path, **kwargs):
    out = io.StringIO()
    status = run_data_check(str(path), out=out, **kwargs)
    return status, out.getvalue().splitlines()


def jsonl(tmp_path, *lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_valid_file_prints_format_rows_and_character_statistics(tmp_path):
    path = jsonl(tmp_path, GOOD, {"prompt": "Hello?", "chosen": " hi there", "rejected": " no"})
    status, lines = check(path)
    assert status == 0
    assert lines[:4] == [f"source: {path}", "format: explicit", "rows: 2", "characters:"]
    assert lines[5].split() == ["prompt", "2", "4.0", "4.0", "6"]
    assert lines[6].split() == ["chosen", "4", "6.5", "6.5", "9"]
    assert lines[-1] == "ok: every row is valid"


def test_k_sample_statistics_cover_every_completion(tmp_path):
    path = jsonl(tmp_path, {"prompt": "Q", "completions": ["a", "bbb", ""], "rewards": [1, 2, 3]},
                 {"prompt": "QQ", "completions": ["cc", "d"], "rewards": [0, 0]})
    status, lines = check(path)
    assert status == 0 and "completions per prompt (K): 2..3" in lines
    assert [x for x in lines if x.startswith("  completions ")][0].split() == [
        "completions", "0", "1.4", "1.0", "3"]
    assert "note: 1 rows have an empty or whitespace-only completion" in lines


def test_invalid_json_reports_the_line(tmp_path):
    path = jsonl(tmp_path, GOOD, GOOD, '{"prompt": "x", "chosen": ', GOOD)
    assert check(path) == (2, [f"{path}:3: -: invalid JSON: Expecting value (column 27)"])


def test_missing_field(tmp_path):
    path = jsonl(tmp_path, GOOD, {"prompt": "Q", "chosen": "a"})
    assert check(path) == (2, [f"{path}:2: rejected: missing field"])


def test_empty_and_whitespace_only_fields(tmp_path):
    path = jsonl(tmp_path, {**GOOD, "chosen": ""}, {**GOOD, "prompt": " \n\t"})
    assert check(path) == (2, [f"{path}:1: chosen: is empty", f"{path}:2: prompt: is whitespace-only"])


def test_wrong_type(tmp_path):
    path = jsonl(tmp_path, GOOD, {**GOOD, "chosen": 3}, {**GOOD, "id": [1]})
    assert check(path) == (2, [f"{path}:2: chosen: must be a string, got int",
                               f"{path}:3: id: must be a string or an integer, got list"])


def test_chosen_identical_to_rejected(tmp_path):
    path = jsonl(tmp_path, {**GOOD, "rejected": GOOD["chosen"]})
    assert check(path) == (2, [f"{path}:1: chosen: is identical to rejected"])
    text = "\n\nHuman: a\n\nAssistant: b"
    path = jsonl(tmp_path, {"chosen": text, "rejected": text}, name="implicit.jsonl")
    assert check(path) == (2, [f"{path}:1: chosen: is identical to rejected"])


def test_mixed_formats_name_the_odd_rows(tmp_path):
    implicit = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    path = jsonl(tmp_path, implicit, GOOD, implicit, implicit, {"prompt": "only"})
    status, lines = check(path)
    assert status == 2
    assert lines == [
        f"{path}:2: -: this row looks like 'explicit' but the file's format is 'implicit' (3 of 5 rows); "
        "its fields: prompt, chosen, rejected",
        f"{path}:5: -: this row looks like 'prompt_only' but the file's format is 'implicit' (3 of 5 rows); "
        "its fields: prompt",
    ]


def test_forced_format_rejects_other_rows(tmp_path):
    path = jsonl(tmp_path, GOOD)
    assert check(path, fmt="prompt_only") == (2, [
        f"{path}:1: -: this row looks like 'explicit' but format 'prompt_only' was requested; "
        "its fields: prompt, chosen, rejected"])
    assert check(path, fmt="explicit")[0] == 0


def test_unrecognizable_and_non_object_rows(tmp_path):
    path = jsonl(tmp_path, GOOD, {"question": "x"}, "[1, 2]")
    assert check(path) == (2, [
        f"{path}:2: -: cannot detect the format: none of the known fields in ['question']",
        f"{path}:3: -: a row must be an object, got list"])


def test_empty_files(tmp_path):
    for name, text in (("e.jsonl", ""), ("blank.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", ""),
                       ("h.csv", "prompt,chosen,rejected\n")):
        (tmp_path / name).write_text(text)
        assert check(tmp_path / name) == (2, [f"{tmp_path / name}:0: -: the file has no rows"])
    with gzip.open(tmp_path / "e.jsonl.gz", "wb"):
        pass
    assert check(tmp_path / "e.jsonl.gz") == (2, [f"{tmp_path / 'e.jsonl.gz'}:0: -: the file has no rows"])


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(b"this is not gzip at all\n" * 10)
    status, lines = check(path)
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith(f"{path}:0: -: cannot decompress (corrupt or truncated gzip): Not a gzipped")


def test_truncated_gzip_reports_the_rows_before_and_where_it_broke(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    blob = gzip.compress("".join(json.dumps({**GOOD, "id": i}) + "\n" for i in range(2000)).encode())
    path.write_bytes(blob[: len(blob) // 2])
    status, lines = check(path)
    assert status == 2 and len(lines) == 1
    row = int(lines[0].split(":")[1])
    assert 1 < row < 2000
    assert lines[0].endswith("cannot decompress (corrupt or truncated gzip): Compressed file ended before "
                             "the end-of-stream marker was reached")


def test_non_utf8_text_reports_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    latin1 = '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1")
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + latin1)
    assert check(path) == (2, [
        f"{path}:2: -: not valid UTF-8 text (invalid continuation byte at byte 16 of the line)"])
    csv_path = tmp_path / "latin1.csv"
    csv_path.write_bytes(b"prompt,chosen,rejected\nQ,a,b\ncaf\xe9,a,b\n")
    assert check(csv_path) == (2, [f"{csv_path}:3: -: not valid UTF-8 text (invalid continuation byte)"])


def test_nonexistent_path(tmp_path):
    path = tmp_path / "missing.jsonl"
    assert check(path) == (2, [f"{path}:0: -: no such file or directory"])


def test_all_errors_are_collected_and_the_first_20_shown(tmp_path):
    path = jsonl(tmp_path, *([{**GOOD, "chosen": ""}] * 55), GOOD)
    status, lines = check(path)
    assert status == 2 and len(lines) == 21
    assert lines[0] == f"{path}:1: chosen: is empty" and lines[19] == f"{path}:20: chosen: is empty"
    assert lines[20] == "... and 35 more errors"


def test_module_entry_point_prints_no_traceback(tmp_path):
    path = jsonl(tmp_path, GOOD, "{oops")
    result = subprocess.run([sys.executable, "-m", "rayalign.data.check", str(path)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stdout == f"{path}:2: -: invalid JSON: Expecting property name enclosed in double quotes " \
                            "(column 2)\n"
    assert result.stderr == ""


@pytest.mark.skipif(not HH.exists(), reason=f"shared Anthropic HH file not found at {HH}")
def test_shared_anthropic_hh_file_checks_clean():
    status, lines = check(HH)
    assert status == 0
    assert lines[1:3] == ["format: implicit", "rows: 2312"]
    assert "note: 4 rows have an empty or whitespace-only completion" in lines
