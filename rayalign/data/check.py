"""`rayalign data check FILE`: validate a data source and describe it.

Options: `--tokenizer PATH`, `--format NAME`, `--split S` (default train), `--subset C`. On success it
prints the source (with its split and subset when not the default), the detected format (one of
`formats.FORMATS`, e.g. `implicit_conversational` for TRL implicit-prompt conversations), `rows: N` and
min / mean / median / max lengths of the text fields (message prompts as rendered), in characters and,
with `--tokenizer`, in tokens (counted without special tokens), and returns 0. On bad input it prints one
`FILE:ROW: FIELD: what is wrong` line per problem (the first 20, then "... and N more errors") and returns
2, never a traceback. A tokenizer that cannot be loaded also returns 2.

The CLI (`rayalign/cli.py`) wires `add_data_check_arguments` and `run_data_check`; `python -m
rayalign.data.check` runs the same command on its own. This module only reads; it never rewrites data.
"""

import argparse
import statistics
import sys
from typing import Any, TextIO

from rayalign.data.chat import render_prompt
from rayalign.data.errors import DataValidationError
from rayalign.data.formats import FORMATS, PAIR_FORMATS, PROMPT_FORMATS
from rayalign.data.load import LoadedData, load_rows
from rayalign.data.readers import Selection

MAX_SHOWN_ERRORS = 20
_TOKENIZE_CHUNK = 1024  # texts per tokenizer call: fast batching without holding every id list at once


def add_data_check_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `FILE`, `--tokenizer` and `--format` (dests: file, tokenizer, format)."""
    parser.add_argument("file", metavar="FILE",
                        help="a .jsonl, .jsonl.gz, .json, .parquet or .csv file, a save_to_disk or dataset directory, "
                             "or a Hugging Face hub dataset id")
    parser.add_argument("--tokenizer", metavar="PATH", default=None,
                        help="tokenizer directory or id: adds token statistics and renders chat templates")
    parser.add_argument("--format", dest="format", choices=FORMATS, default=None,
                        help="require this format instead of detecting it")
    parser.add_argument("--split", default="train",
                        help="the split of a save_to_disk DatasetDict, a dataset directory or a hub id (default: "
                             "train, the only split of a single file)")
    parser.add_argument("--subset", default=None,
                        help="the subset (dataset config name) of a hub id or a dataset directory")


def run_data_check(path: str, *, tokenizer: str | None = None, fmt: str | None = None,
                   split: str = "train", subset: str | None = None, out: TextIO = sys.stdout) -> int:
    """Check `path` and print the report to `out`; 0 when every row is valid, 2 otherwise."""
    tok = None
    if tokenizer is not None:
        try:
            tok = _load_tokenizer(tokenizer)
        except Exception as e:  # noqa: BLE001 - loading can fail in many ways; all are "bad argument"
            print(f"{tokenizer}:0: -: cannot load tokenizer: {type(e).__name__}: {e}", file=out)
            return 2
    try:
        select = Selection(split=split, subset=subset, split_key="--split", subset_key="--subset")
        data = load_rows(path, fmt=fmt, tokenizer=tok, select=select)
    except DataValidationError as e:
        for error in e.errors[:MAX_SHOWN_ERRORS]:
            print(error, file=out)
        if len(e.errors) > MAX_SHOWN_ERRORS:
            print(f"... and {len(e.errors) - MAX_SHOWN_ERRORS} more errors", file=out)
        return 2
    _print_report(data, tok, tokenizer, out)
    return 0


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def text_fields(data: LoadedData, tokenizer: Any = None) -> dict[str, list[str]]:
    """The texts whose lengths the report describes, by field name (k_sample completions flattened; message
    prompts rendered with `tokenizer`'s chat template, or the fallback template without one)."""
    rows = data.rows
    if data.format in PROMPT_FORMATS:
        return {"prompt": [r["prompt"] if isinstance(r["prompt"], str) else render_prompt(r["prompt"], tokenizer)
                           for r in rows]}
    if data.format == "k_sample":
        completions = [c for r in rows for c in r["completions"]]
        return {"prompt": [r["prompt"] for r in rows], "completions": completions}
    names = ("prompt", "chosen", "rejected")  # pair formats and gdpo
    return {name: [r[name] for r in rows] for name in names}


def length_stats(lengths: list[int]) -> tuple[int, float, float, int]:
    """(min, mean, median, max) of a non-empty list of lengths."""
    return min(lengths), statistics.fmean(lengths), float(statistics.median(lengths)), max(lengths)


def _print_report(data: LoadedData, tok: Any, tokenizer_path: str | None, out: TextIO) -> None:
    select, part = data.select, ""
    if select.split != "train" or select.subset is not None:  # the default selection is not repeated
        part = f" (split {select.split}" + (f", subset {select.subset}" if select.subset is not None else "") + ")"
    print(f"source: {data.path}{part}", file=out)
    print(f"format: {data.format}", file=out)
    print(f"rows: {len(data.rows)}", file=out)
    if data.format == "k_sample":
        ks = sorted({len(r["completions"]) for r in data.rows})
        print(f"completions per prompt (K): {ks[0]}" + (f"..{ks[-1]}" if len(ks) > 1 else ""), file=out)
    fields = text_fields(data, tok)
    _print_table("characters", {name: [len(t) for t in texts] for name, texts in fields.items()}, out)
    if tok is not None:
        counts = {name: _token_counts(tok, texts) for name, texts in fields.items()}
        _print_table(f"tokens ({tokenizer_path})", counts, out)
    blank = _blank_completions(data)
    if blank:
        print(f"note: {blank} rows have an empty or whitespace-only completion", file=out)
    print("ok: every row is valid", file=out)


def _print_table(title: str, lengths: dict[str, list[int]], out: TextIO) -> None:
    width = max(len(name) for name in lengths)
    print(f"{title}:", file=out)
    print(f"  {'':<{width}} {'min':>8} {'mean':>10} {'median':>10} {'max':>8}", file=out)
    for name, values in lengths.items():
        low, mean, median, high = length_stats(values)
        print(f"  {name:<{width}} {low:>8} {mean:>10.1f} {median:>10.1f} {high:>8}", file=out)


def _token_counts(tok: Any, texts: list[str]) -> list[int]:
    counts = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        ids = tok(texts[start:start + _TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"]
        counts.extend(len(x) for x in ids)
    return counts


def _blank_completions(data: LoadedData) -> int:
    # Implicit rows may legitimately have an empty reply (HH has four); k_sample may hold empty samples.
    if data.format in PAIR_FORMATS:
        return sum(1 for r in data.rows if not r["chosen"].strip() or not r["rejected"].strip())
    if data.format == "k_sample":
        return sum(1 for r in data.rows if any(not c.strip() for c in r["completions"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayalign data check", description=__doc__.splitlines()[0])
    add_data_check_arguments(parser)
    args = parser.parse_args(argv)
    return run_data_check(args.file, tokenizer=args.tokenizer, fmt=args.format, split=args.split,
                          subset=args.subset)


if __name__ == "__main__":
    sys.exit(main())
