"""`load_rows`: one call from a data source to validated, normalized rows of a single format.

It reads the records (`readers.py`), detects each record's format (`formats.py`), decides the file's format
(the `fmt` argument if given, else the most common detected format, ties going to the one seen first),
reports every row that looks like another format, validates and normalizes the rest, and raises one
`DataValidationError` listing every problem in file order, or returns a `LoadedData`.

It does not tokenize, filter by length or shuffle: those belong to the stages that use the rows.
"""

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from rayalign.data.errors import WHOLE, DataValidationError, RowError
from rayalign.data.formats import FORMATS, detect_format, normalize_row
from rayalign.data.prompts import prompt_of
from rayalign.data.readers import DEFAULT_SELECTION, Selection, read_records


@dataclass
class LoadedData:
    format: str  # one of FORMATS
    rows: list[dict[str, Any]]  # normalized rows, in file order
    path: str  # the source as given (a path or a hub id)
    select: Selection = DEFAULT_SELECTION  # the split and subset read


def load_rows(
    source: str | os.PathLike, *, fmt: str | None = None, tokenizer: Any = None,
    select: Selection = DEFAULT_SELECTION, as_prompts: bool = False,
) -> LoadedData:
    """Read, validate and normalize every row of `source`; raise `DataValidationError` listing all problems.

    `fmt` forces a format (rows that look like another one are errors). `tokenizer` is a loaded HF
    tokenizer whose chat template renders conversational rows (None: the fallback template, see chat.py).
    `select` picks the split and subset (`readers.Selection`; default: split "train", no subset).
    `as_prompts`: every valid row becomes `{"prompt": prompts.prompt_of(...)}`, a loop prompt (text, or the
    messages of a conversational format), whatever the format (pairs give their prompt).
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    raw = read_records(source, select=select)
    errors = list(raw.errors)
    detected = []
    for row_number, record in raw.records:
        try:
            detected.append((row_number, record, detect_format(record)))
        except ValueError as e:
            errors.append(RowError(raw.path, row_number, WHOLE, str(e)))
    if not raw.records and not raw.errors:
        errors.append(RowError(raw.path, 0, WHOLE, "the file has no rows"))
    file_format, reason = _file_format([d[2] for d in detected], fmt)
    rows = []
    for row_number, record, looks_like in detected:
        if looks_like != file_format:
            message = f"this row looks like {looks_like!r} but {reason}; its fields: {_fields(record)}"
            errors.append(RowError(raw.path, row_number, WHOLE, message))
            continue
        row, problems = normalize_row(record, file_format, tokenizer)
        errors.extend(RowError(raw.path, row_number, field, message) for field, message in problems)
        if row is not None:
            rows.append({"prompt": prompt_of(record, file_format, row)} if as_prompts else row)
    if errors:
        # Reading errors and row errors were found in different passes; show them in file order.
        raise DataValidationError(sorted(errors, key=lambda e: e.row))
    return LoadedData(format=file_format, rows=rows, path=raw.path, select=select)


def _file_format(detected: list[str], fmt: str | None) -> tuple[str | None, str]:
    """The format every row must have, and how it was chosen (for the mismatch message)."""
    if fmt is not None:
        return fmt, f"format {fmt!r} was requested"
    if not detected:
        return None, "no row has a recognizable format"
    counts = Counter(detected)
    # most_common keeps first-seen order among equal counts, so a tie goes to the format seen first.
    name, count = counts.most_common(1)[0]
    return name, f"the file's format is {name!r} ({count} of {len(detected)} rows)"


def _fields(record: dict) -> str:
    return ", ".join(str(k) for k, v in record.items() if v is not None) or "(none)"
