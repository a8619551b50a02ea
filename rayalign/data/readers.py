"""Files in, raw records out: .jsonl, .jsonl.gz, .json, .parquet, .csv, save_to_disk directories, hub ids.

`read_records` returns every record it could read with its row number, plus a `RowError` for everything it
could not (bad JSON, bad UTF-8, a corrupt or truncated file), so the caller can report all problems at once.
It does not look at the fields: detecting and validating formats is `formats.py`'s job.

Sources, with the split and subset (dataset config name) they take:
- an existing file, read by its suffix: one split, `train`; another split or any subset is an error;
- a directory written by `DatasetDict.save_to_disk` (`split` picks one of its splits) or by
  `Dataset.save_to_disk` (one split: `train`, or the split name it recorded when it was loaded with one);
  such a directory has no subsets, so a subset is an error;
- any other directory is read by `datasets.load_dataset(DIR, subset, split=split)`: a dataset repository's
  files (e.g. downloaded from the hub: data/train-*.parquet, or a README declaring configs = subsets);
- a source that does not exist is a Hugging Face hub id (`datasets.load_dataset(id, subset, split=split)`)
  only if it could be one: at most one "/", no known file suffix and not starting with ".", "/" or "~".
  Anything else is a missing path, reported as such rather than sent to the hub.
A wrong split or subset is one `RowError` at row 0 naming the setting (`split_key`, `subset_key`: the
config key or command-line option the caller took it from) and, where known, the splits that exist.

`write_rows_parquet` writes stage artifacts atomically; reading the .parquet back gives the same rows, with
a field missing from some rows coming back as None (the validators treat None as absent).
"""

import csv
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayalign.data.errors import WHOLE, RowError

SUFFIXES = (".jsonl.gz", ".jsonl", ".json", ".parquet", ".csv")

# CSV cells are strings; these fields hold numbers or lists, so their cells are parsed as JSON
# (`8.5`, `[1, 2]`, `["a", "b"]`). An empty cell in them means "absent".
_CSV_JSON_FIELDS = frozenset(
    {"score_chosen", "score_rejected", "completions", "rewards", "target", "belief", "rejected_belief",
     "ref_chosen_logps", "ref_rejected_logps", "ref_logps"}
)


@dataclass
class RawData:
    path: str
    records: list[tuple[int, Any]] = field(default_factory=list)  # (row number, decoded record)
    errors: list[RowError] = field(default_factory=list)


@dataclass(frozen=True)
class Selection:
    """Which part of a source to read, and the settings to name when it does not exist."""

    split: str = "train"
    subset: str | None = None
    split_key: str = "data.split"
    subset_key: str = "data.subset"

    def split_error(self, path: str, reason: str) -> RowError:
        return RowError(path, 0, WHOLE, f"{self.split_key}: {reason}")

    def subset_error(self, path: str, reason: str) -> RowError:
        return RowError(path, 0, WHOLE, f"{self.subset_key}: {reason}")


DEFAULT_SELECTION = Selection()  # split "train", no subset


def read_records(source: str | os.PathLike, *, select: Selection = DEFAULT_SELECTION) -> RawData:
    """Read `source` into (row number, record) pairs, collecting read errors instead of raising."""
    path = os.fspath(source)
    raw = RawData(path=path)
    if os.path.isdir(path):
        if _is_saved_dataset(path):
            _read_saved_dataset(path, select, raw)
        else:
            _read_with_load_dataset(path, select, raw, what="a datasets save_to_disk directory")
    elif os.path.exists(path):
        if select.split != "train":
            raw.errors.append(select.split_error(path, f"no split {select.split!r}: a single file holds one split, "
                                                       "'train' (named splits need a save_to_disk directory or a "
                                                       "hub id)"))
        elif select.subset is not None:
            raw.errors.append(select.subset_error(path, f"no subset {select.subset!r}: a single file has no subsets "
                                                        "(dataset configs)"))
        else:
            _read_file(path, raw)
    elif _could_be_hub_id(path):
        _read_with_load_dataset(path, select, raw, what="a local path")
    else:
        raw.errors.append(RowError(path, 0, WHOLE, "no such file or directory"))
    return raw


def _could_be_hub_id(path: str) -> bool:
    name = path.lower()
    return (
        path.count("/") <= 1
        and not path.startswith((".", "/", "~"))
        and not name.endswith(SUFFIXES)
    )


def _read_file(path: str, raw: RawData) -> None:
    name = path.lower()
    try:
        if name.endswith(".jsonl.gz"):
            with gzip.open(path, "rb") as f:
                _read_jsonl_lines(f, raw, compressed=True)
        elif name.endswith(".jsonl"):
            with open(path, "rb") as f:
                _read_jsonl_lines(f, raw, compressed=False)
        elif name.endswith(".json"):
            _read_json(path, raw)
        elif name.endswith(".parquet"):
            _read_parquet(path, raw)
        elif name.endswith(".csv"):
            _read_csv(path, raw)
        else:
            expected = ", ".join(SUFFIXES)
            raw.errors.append(RowError(path, 0, WHOLE, f"unsupported file type (expected {expected} "
                                                       "or a datasets save_to_disk directory)"))
    except PermissionError as e:
        raw.errors.append(RowError(path, 0, WHOLE, f"cannot read file: {e.strerror}"))


def _read_jsonl_lines(f: io.BufferedIOBase, raw: RawData, *, compressed: bool) -> None:
    lineno = 0
    try:
        for lineno, line in enumerate(f, start=1):
            _decode_jsonl_line(line, lineno, raw)
    except (OSError, EOFError, zlib.error) as e:
        # A corrupt or truncated gzip stream fails while iterating; the lines before it are still reported.
        kind = "cannot decompress (corrupt or truncated gzip)" if compressed else "read error"
        raw.errors.append(RowError(raw.path, lineno + 1 if lineno else 0, WHOLE, f"{kind}: {e}"))


def _decode_jsonl_line(line: bytes, lineno: int, raw: RawData) -> None:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raw.errors.append(RowError(raw.path, lineno, WHOLE, f"not valid UTF-8 text ({e.reason} at byte "
                                                            f"{e.start + 1} of the line)"))
        return
    text = text.rstrip("\r\n")  # so a JSON error's column counts within this line
    if lineno == 1:
        text = text.removeprefix("\ufeff")  # tolerate a UTF-8 byte-order mark
    if not text.strip():
        return  # blank lines (e.g. a trailing newline) are not rows
    try:
        raw.records.append((lineno, json.loads(text)))
    except json.JSONDecodeError as e:
        raw.errors.append(RowError(raw.path, lineno, WHOLE, f"invalid JSON: {e.msg} (column {e.colno})"))


def _decode_whole(path: str, raw: RawData) -> str | None:
    """Read a whole text file as UTF-8, reporting the line of the first bad byte."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raw.errors.append(RowError(path, line, WHOLE, f"not valid UTF-8 text ({e.reason})"))
        return None


def _read_json(path: str, raw: RawData) -> None:
    text = _decode_whole(path, raw)
    if text is None:
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one JSON object per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        raw.errors.append(RowError(path, e.lineno, WHOLE, f"invalid JSON: {e.msg} (column {e.colno}){hint}"))
        return
    if not isinstance(value, list):
        raw.errors.append(RowError(path, 0, WHOLE, f"a .json file must hold a list of row objects, "
                                                   f"got a JSON {type(value).__name__}"))
        return
    raw.records.extend(enumerate(value, start=1))


def _read_parquet(path: str, raw: RawData) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raw.errors.append(RowError(path, 0, WHOLE, f"cannot read Parquet: {e}"))
        return
    raw.records.extend(enumerate(rows, start=1))


def _read_csv(path: str, raw: RawData) -> None:
    text = _decode_whole(path, raw)
    if text is None:
        return
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        while True:
            start = reader.line_num + 1  # a quoted cell may span lines: report where the record starts
            cells = next(reader, None)
            if cells is None:
                break
            if cells:
                raw.records.append((start, _csv_record(header, cells)))
    except csv.Error as e:
        raw.errors.append(RowError(path, reader.line_num, WHOLE, f"invalid CSV: {e}"))


def _csv_record(header: list[str], cells: list[str]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for name, cell in zip(header, cells):
        if name in _CSV_JSON_FIELDS:
            record[name] = _csv_json_cell(cell)
        else:
            record[name] = cell
    return record  # a short row leaves its last columns absent, which validation reports as missing


def _csv_json_cell(cell: str) -> Any:
    if not cell.strip():
        return None
    try:
        return json.loads(cell)
    except json.JSONDecodeError:
        return cell  # left as a string, so validation reports the wrong type for this field


def _is_saved_dataset(path: str) -> bool:
    # What `save_to_disk` writes: dataset_dict.json for a DatasetDict, state.json for a Dataset.
    return any(os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json"))


def _read_saved_dataset(path: str, select: Selection, raw: RawData) -> None:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raw.errors.append(RowError(path, 0, WHOLE, f"not a datasets save_to_disk directory: {_one_line(e)}"))
        return
    if select.subset is not None:
        raw.errors.append(select.subset_error(path, f"no subset {select.subset!r}: a save_to_disk directory has "
                                                    "no subsets (dataset configs)"))
        return
    if isinstance(loaded, datasets.DatasetDict):
        if select.split not in loaded:
            raw.errors.append(select.split_error(path, f"no split {select.split!r}; the splits are "
                                                       f"{', '.join(sorted(loaded))}"))
            return
        loaded = loaded[select.split]
    else:
        # A single Dataset is one split: "train" (the default) or the name it was loaded with, if any.
        names = ["train", *([str(loaded.split)] if loaded.split is not None else [])]
        if select.split not in names:
            raw.errors.append(select.split_error(path, f"no split {select.split!r}: a saved single Dataset holds "
                                                       f"one split, {' or '.join(map(repr, dict.fromkeys(names)))}"))
            return
    raw.records.extend(enumerate(loaded.to_list(), start=1))


def _read_with_load_dataset(name: str, select: Selection, raw: RawData, *, what: str) -> None:
    """A hub id or a dataset repository directory, through `datasets.load_dataset`."""
    import datasets

    try:
        loaded = datasets.load_dataset(name, select.subset, split=select.split)
    except Exception as e:  # noqa: BLE001 - the hub client raises many types; all mean "cannot load"
        message = _one_line(e)
        if isinstance(e, ValueError) and message.startswith("Unknown split"):
            raw.errors.append(select.split_error(name, message))
        elif isinstance(e, ValueError) and ("BuilderConfig" in message or "Config name is missing" in message):
            raw.errors.append(select.subset_error(name, message))
        else:
            raw.errors.append(RowError(name, 0, WHOLE, f"not {what}, and loading it with datasets.load_dataset "
                                                       f"failed: {type(e).__name__}: {message}"))
        return
    raw.records.extend(enumerate(loaded.to_list(), start=1))


def _one_line(error: Exception) -> str:
    """An exception's message on one line (datasets' messages span several)."""
    return " ".join(str(error).split())


def write_rows_parquet(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write rows to a Parquet file atomically: to `path + ".tmp-<pid>"`, then `os.replace`.

    The columns are the union of the rows' keys, in order of first appearance; a row without a key gets
    None there. A reader never sees a half-written file, and a crash leaves at most the temporary file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    table = pa.table({name: [row.get(name) for row in rows] for name in names})
    final = os.fspath(path)
    tmp = f"{final}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, final)
    finally:
        Path(tmp).unlink(missing_ok=True)
