"""Preference and prompt data in, validated normalized rows out; Parquet stage artifacts.

    from rayalign.data import load_rows
    data = load_rows("harmless-base-test.jsonl.gz")   # data.format == "implicit"
    data.rows[0]                                       # {"prompt": ..., "chosen": ..., "rejected": ...}

Modules: `readers` (files -> raw records), `formats` (detect, validate, normalize one record), `chat`
(conversational rendering), `load` (`load_rows`: a whole source), `prompts` (loop prompts: text or messages),
`check` (`rayalign data check`), `errors`.
Nothing here imports ray, vllm or deepspeed; transformers, datasets and pyarrow are imported only inside
the functions that need them. `check` is not imported here so `python -m rayalign.data.check` runs cleanly.
"""

from rayalign.data.errors import DataValidationError, RowError
from rayalign.data.formats import (
    FORMATS,
    PAIR_FORMATS,
    PROMPT_FORMATS,
    detect_format,
    normalize_row,
    split_implicit_prompt,
)
from rayalign.data.load import LoadedData, load_rows
from rayalign.data.prompts import Prompt
from rayalign.data.readers import Selection, write_rows_parquet

__all__ = [
    "FORMATS",
    "PAIR_FORMATS",
    "PROMPT_FORMATS",
    "DataValidationError",
    "LoadedData",
    "Prompt",
    "RowError",
    "Selection",
    "detect_format",
    "load_rows",
    "normalize_row",
    "split_implicit_prompt",
    "write_rows_parquet",
]
