"""Files in, raw records out: .jsonl, .jsonl.gz, .json, .parquet, .csv, save_to_disk directories, hub ids.

`read_records` returns every record it could read with its row number, plus a `RowError` for everything it
could not (bad JSON, bad UTF-8, a corrupt or truncated file), so the caller can report all problems at once.
It does not look at the fields: detecting and validating formats is `formats.py`'s job.

Sources: an existing file is read by its suffix; an existing directory must come from
`datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`, then `split` picks the split). A source that
does not exist is treated as a Hugging Face hub id (`datasets.load_dataset(id, split=split)`) only if it
could be one: at most one "/", no known file suffix and not starting with ".", "/" or "~". Anything else is a
missing path, reported as such rather than sent to the hub.

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
    {"score_chosen", "score_rejected", "completions", "rewards", "target", "belief", "rejected_belief"}
)


@dataclass
class RawData:
    path: str
    records: list[tuple[int, Any]] = field(default_factory=list)  # (row number, decoded record)
    errors: list[RowError] = field(default_factory=list)


def read_records(source: str | os.PathLike, *, split: str = "train") -> RawData:
    """Read `source` into (row number, record) pairs, collecting read errors instead of raising."""
    path = os.fspath(source)
    raw = RawData(path=path)
    if os.path.isdir(path):
        _read_saved_dataset(path, split, raw)
    elif os.path.exists(path):
        _read_file(path, raw)
    elif _could_be_hub_id(path):
        _read_hub(path, split, raw)
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


def _read_saved_dataset(path: str, split: str, raw: RawData) -> None:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raw.errors.append(RowError(path, 0, WHOLE, f"not a datasets save_to_disk directory: {e}"))
        return
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raw.errors.append(RowError(path, 0, WHOLE, f"no split {split!r} (has {sorted(loaded)})"))
            return
        loaded = loaded[split]
    raw.records.extend(enumerate(loaded.to_list(), start=1))


def _read_hub(name: str, split: str, raw: RawData) -> None:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - the hub client raises many types; all mean "cannot load"
        raw.errors.append(RowError(name, 0, WHOLE, f"not a local path, and loading it as a Hugging Face "
                                                   f"hub dataset failed: {type(e).__name__}: {e}"))
        return
    raw.records.extend(enumerate(loaded.to_list(), start=1))


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
