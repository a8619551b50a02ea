"""Every file type loads and normalizes the same rows; Parquet artifacts round-trip, written atomically.

Files are written to tmp_path; `datasets` is used only for the save_to_disk cases. No network.
"""

import csv
import gzip
import json
import os

import pytest

from rayalign.data import DataValidationError, Selection, load_rows, write_rows_parquet
from rayalign.data.readers import read_records

PAIRS = [
    {"id": 1, "prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"},
    {"id": 2, "prompt": "Capital of France?", "chosen": " Paris", "rejected": " Lyon, \"obviously\"\nno"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path, records):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def test_jsonl(tmp_path):
    data = load_rows(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    assert (data.format, data.rows, data.path) == ("explicit", PAIRS, str(tmp_path / "p.jsonl"))


def test_jsonl_gz_with_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n" + json.dumps(PAIRS[0]) + "\n\n" + json.dumps(PAIRS[1]) + "\n")
    assert load_rows(path).rows == PAIRS
    assert [n for n, _ in read_records(path).records] == [2, 4]  # row numbers are line numbers


def test_json_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(PAIRS, indent=2))
    assert load_rows(path).rows == PAIRS


def test_json_that_is_not_a_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"rows": PAIRS}))
    with pytest.raises(DataValidationError) as e:
        load_rows(path)
    assert [str(x) for x in e.value.errors] == [
        f"{path}:0: -: a .json file must hold a list of row objects, got a JSON dict"]


def test_json_lines_named_json_gets_a_hint(tmp_path):
    path = write_jsonl(tmp_path / "p.json", PAIRS)
    with pytest.raises(DataValidationError) as e:
        load_rows(path)
    assert str(e.value.errors[0]).startswith(f"{path}:2: -: invalid JSON: Extra data")
    assert "name the file .jsonl" in str(e.value.errors[0])


def test_csv_strings_and_row_numbers(tmp_path):
    path = write_csv(tmp_path / "p.csv", PAIRS)
    rows = load_rows(path).rows
    assert rows == [{**r, "id": str(r["id"])} for r in PAIRS]  # CSV cells are strings, ids included
    # the second record's quoted cell spans two lines; rows are numbered by the line they start on
    assert [n for n, _ in read_records(path).records] == [2, 3]


def test_csv_json_valued_fields(tmp_path):
    path = tmp_path / "k.csv"
    path.write_text('prompt,completions,rewards\nQ,"[""a"", ""b""]","[1, 0.5]"\nR,"[""c"", ""d""]",oops\n')
    with pytest.raises(DataValidationError) as e:
        load_rows(path)
    assert [str(x) for x in e.value.errors] == [f"{path}:3: rewards: must be a list of numbers, got string"]
    path.write_text('prompt,chosen,rejected,score_chosen,score_rejected\nQ,a,b,8.5,\n')
    assert load_rows(path).rows == [{"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": 8.5}]


def test_parquet_round_trip_of_every_row_shape(tmp_path):
    sets = {
        "explicit": [{**PAIRS[0], "score_chosen": 1.5, "score_rejected": 0.0}, PAIRS[1]],
        "k_sample": [{"prompt": "Q", "completions": ["a", "b"], "rewards": [1.0, -1.0]}],
        "gdpo": [{"prompt": "P", "target": [0.25, 0.75], "belief": 1, "belief_text": "yes", "chosen": " A",
                  "rejected": " B", "rejected_belief": 0, "rejected_belief_text": "no", "group": "g"}],
        "prompt_only": [{"prompt": "P", "id": "x"}],
    }
    for fmt, rows in sets.items():
        path = tmp_path / f"{fmt}.parquet"
        write_rows_parquet(rows, path)
        data = load_rows(path)
        assert (data.format, data.rows) == (fmt, rows)
        assert os.listdir(tmp_path).count(f"{fmt}.parquet") == 1
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_write_rows_parquet_replaces_atomically_and_cleans_up_on_failure(tmp_path):
    path = tmp_path / "a.parquet"
    write_rows_parquet(PAIRS, path)
    write_rows_parquet(PAIRS[:1], str(path))
    assert load_rows(path).rows == PAIRS[:1]
    with pytest.raises(TypeError):  # pyarrow cannot put a string and an int in one column
        write_rows_parquet([{"prompt": "a"}, {"prompt": 1}], path)
    assert load_rows(path).rows == PAIRS[:1]  # the old file is untouched
    assert os.listdir(tmp_path) == ["a.parquet"]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(PAIRS).save_to_disk(tmp_path / "ds")
    assert load_rows(tmp_path / "ds").rows == PAIRS
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS[:1]),
                               "test": datasets.Dataset.from_list(PAIRS[1:])})
    dd.save_to_disk(tmp_path / "dd")
    assert load_rows(tmp_path / "dd", select=Selection(split="test")).rows == PAIRS[1:]
    with pytest.raises(DataValidationError, match="data.split: no split .valid.; the splits are test, train"):
        load_rows(tmp_path / "dd", select=Selection(split="valid"))


def test_plain_directory_is_not_a_dataset(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataValidationError, match="not a datasets save_to_disk directory"):
        load_rows(tmp_path / "d")


def test_unsupported_suffix_and_missing_paths_never_go_to_the_hub(tmp_path):
    (tmp_path / "p.txt").write_text("hello")
    assert "unsupported file type" in read_records(tmp_path / "p.txt").errors[0].message
    for missing in (tmp_path / "nope.jsonl", "nope.jsonl", "./nope", "a/b/c", "~/x"):
        errors = read_records(missing).errors
        assert [(e.row, e.field, e.message) for e in errors] == [(0, "-", "no such file or directory")]


def test_unknown_format_name_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'dpo'"):
        load_rows(write_jsonl(tmp_path / "p.jsonl", PAIRS), fmt="dpo")
