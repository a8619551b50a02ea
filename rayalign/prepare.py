"""Preparation of preference pairs: tokenize, then score with the reference once (Ray Data), cache as Parquet.

    rows -> encode_frame (this process) [-> map_batches(ReferenceScorer, actor pool) unless cached or given]

The reference log-probs (and, for MallowsPO, mean entropies) depend only on the reference model, the
data, the tokenization and the scoring settings, so they are stored under `ref_cache/<hash>.parquet`,
keyed by a hash of exactly those, and reused by any later run that agrees on all of them (the log says
so). Train and eval splits are scored in one Ray Data execution. Every data kind (`rayalign.data_kind`, decided
by the driver and passed in) takes the same path through `rayalign.encode`; K-sample groups' reference
log-probs are a list column `ref_logps` (K per row). Rows that carry their reference's log-probs (the loop's
judged pairs, whose judge was the reference) skip the scoring and the cache. The training workers read the
prepared Parquet; nothing here trains.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rayalign.config import Config
from rayalign.data.formats import GROUP_REFERENCE_FIELD, PAIR_REFERENCE_FIELDS
from rayalign.data_kind import GROUPS, PAIRS
from rayalign.devices import actor_resources, inference_dtype
from rayalign.encode import TEXT_FIELDS, collate, encode_row, encoded_rows
from rayalign.loss_registry import needs_dispersion
from rayalign.models import LoadOptions

SCORE_BLOCK = 256
CACHE_VERSION = 3  # bump when the encoding or scoring code changes what an entry holds (2: token ids too;
# 3: `rayalign.templating` ends a completion at its own trailing eos instead of appending a second one)


def encode_frame(tokenizer, frame: pd.DataFrame, kind: str, *, max_prompt_length: int,
                 max_completion_length: int) -> pd.DataFrame:
    """Rows of `kind` (with `pair_index`) -> token ids and truncation flags (`rayalign.encode.encode_row`)."""
    fields = TEXT_FIELDS[kind]
    rows = [dict(zip(fields, values)) for values in zip(*(frame[c] for c in fields))]
    out = pd.DataFrame([encode_row(tokenizer, row, kind, max_prompt_length=max_prompt_length,
                                   max_completion_length=max_completion_length) for row in rows])
    out.insert(0, "pair_index", frame["pair_index"].to_numpy())
    return out


class PairEncoder:
    """Callable class (a Ray Data actor, or in-process): text pairs -> token ids and truncation flags."""

    def __init__(self, tokenizer_path: str, max_prompt_length: int, max_completion_length: int,
                 load: LoadOptions | None = None, *, kind: str):
        from rayalign.models import load_tokenizer
        from rayalign.storage import materialize

        self.tokenizer = load_tokenizer(materialize(tokenizer_path), load)
        self.lengths = {"max_prompt_length": max_prompt_length, "max_completion_length": max_completion_length}
        self.kind = kind

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return encode_frame(self.tokenizer, batch, self.kind, **self.lengths)


class ReferenceScorer:
    """Ray Data callable class: adds reference log-probs (and entropies) to token-id rows, no gradient."""

    def __init__(self, reference_path: str, config: Config, pad_token_id: int, *, kind: str):
        import torch

        from rayalign.devices import stage_device
        from rayalign.models import load_model
        from rayalign.storage import materialize

        reference_path = materialize(reference_path)  # run.storage: this node's cached copy
        torch.set_num_threads(max(1, int(os.environ.get("RAYALIGN_SCORER_THREADS", torch.get_num_threads()))))
        self.model = load_model(reference_path, LoadOptions.of(config.model), dtype=reference_dtype(config),
                                device=stage_device(config.ref.gpus_per_actor, "ref"))
        self.config, self.pad_token_id, self.kind = config, pad_token_id, kind
        self.want_entropy = needs_dispersion(config.loss)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from rayalign.step import reference_scores

        encoded = encoded_rows(batch, self.kind)
        collated = collate(encoded, self.kind, pad_token_id=self.pad_token_id)
        device = self.model.device
        scores = reference_scores(self.model, {k: v.to(device) for k, v in collated.items()}, self.config,
                                  want_entropy=self.want_entropy)
        out = batch.copy()
        for key, value in scores.items():
            # A group's (B, K) reference log-probs become a list column (Arrow list<double>).
            value = value.double().cpu()
            out[key] = value.tolist() if value.dim() > 1 else value.numpy()
        return out


def reference_dtype(config: Config) -> str:
    """The dtype the reference scorer loads its model in (`ref.dtype` on its device); a cache key."""
    return inference_dtype(config.ref.dtype, config.ref.gpus_per_actor)


def fingerprint_model(path: str) -> str:
    """Config content plus name, size and mtime of every file of a local model dir (a hub id: the id; a
    run.storage location: its commit id)."""
    if "://" in path:
        from rayalign.storage import fingerprint

        return fingerprint(path)
    local = Path(path)
    if not local.is_dir():
        return path
    digest = hashlib.sha256()
    for file in sorted(local.iterdir()):
        if file.is_file():
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    digest.update((local / "config.json").read_bytes() if (local / "config.json").exists() else b"")
    return digest.hexdigest()


def scoring_settings(config: Config, *, entropy: bool | None = None) -> dict:
    """The config values the cached reference columns depend on (besides the models and the data); a
    sweep (`rayalign.tune`) warms one cache entry per distinct value of this. `entropy`: whether the entry
    holds the reference entropies too (default: whether the loss needs them)."""
    return {"dtype": reference_dtype(config), "max_prompt_length": config.data.max_prompt_length,
            "max_completion_length": config.data.max_completion_length,
            "temperature": config.loss.logit_temperature, "padding_free": config.packs_rows,
            "entropy": needs_dispersion(config.loss) if entropy is None else entropy,
            # which weights a hub id names, and the attention kernel (last bits); only when set, so the keys
            # of existing cache entries stay valid
            **{f"model.{key}": value for key in ("revision", "attn_implementation")
               if (value := getattr(config.model, key)) is not None}}


def cache_key(frame: pd.DataFrame, config: Config, *, kind: str, reference_path: str, tokenizer_path: str,
              entropy: bool | None = None) -> str:
    """Hash of (reference model, data kind and every field the encoder reads, tokenization and scoring
    settings): all an entry holds (token ids, truncation flags, reference columns) depends on."""
    digest = hashlib.sha256()
    settings = {"version": CACHE_VERSION, "kind": kind, "model": fingerprint_model(reference_path),
                "tokenizer": fingerprint_model(tokenizer_path), **scoring_settings(config, entropy=entropy)}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for column in TEXT_FIELDS[kind]:  # rewards and level targets too: the entry's encoded rows carry them
        for value in frame[column]:
            digest.update(b"\x00" + json.dumps(value, default=lambda v: v.tolist()).encode())  # numpy lists
    return digest.hexdigest()[:24]


@dataclass
class PreparedPairs:
    frames: dict[str, pd.DataFrame]  # per split: pair_index, ids, truncation flags, ref_* when cached
    prompts_truncated: int
    completions_truncated: int
    cache_path: Path | None
    cache_hit: bool


def _encode_and_score(frame: pd.DataFrame, config: Config, *, kind: str, tokenizer, reference_path: str | None,
                      pad_token_id: int) -> pd.DataFrame:
    """Token ids in this process (a fast tokenizer: tens of thousands of rows a second; an actor would only
    add its start-up), then, given `reference_path`, one Ray Data pass of ReferenceScorer actors."""
    encoded = encode_frame(tokenizer, frame, kind, max_prompt_length=config.data.max_prompt_length,
                           max_completion_length=config.data.max_completion_length)
    if not reference_path:
        return encoded
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    # blocks of SCORE_BLOCK rows: a Ray Data block goes to one actor, so several let ref.num_actors share them
    blocks = [encoded.iloc[i:i + SCORE_BLOCK] for i in range(0, len(encoded), SCORE_BLOCK)] or [encoded]
    dataset = ray.data.from_pandas(blocks).map_batches(
        ReferenceScorer, fn_constructor_args=(reference_path, config, pad_token_id),
        fn_constructor_kwargs={"kind": kind}, batch_format="pandas",
        batch_size=config.ref.batch_size, compute=ray.data.ActorPoolStrategy(size=config.ref.num_actors),
        num_cpus=1, **actor_resources(config.ref.gpus_per_actor, config.ref.resources))
    return dataset.to_pandas().sort_values("pair_index").reset_index(drop=True)


def reference_from_rows(rows: list[dict], kind: str) -> pd.DataFrame | None:
    """The rows' own reference log-probs as prepared columns (`REF_KEYS` but the means, or a group's
    `ref_logps`), or None unless every row carries them (only pairs and K-sample groups can)."""
    fields = {PAIRS: PAIR_REFERENCE_FIELDS, GROUPS: (GROUP_REFERENCE_FIELD,)}.get(kind)
    if not fields or not rows or any(row.get(f) is None for row in rows for f in fields):
        return None
    return pd.DataFrame({f: [row[f] for row in rows] for f in fields})


def with_row_reference(encoded: pd.DataFrame, reference: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Encoded rows (in `pair_index` order) plus the rows' reference columns; pairs also get the per-token
    means, the sums over the encoded completion lengths (as `rayalign.step.sequence_scores` averages)."""
    out = pd.concat([encoded, reference.reset_index(drop=True)], axis=1)
    if kind == PAIRS:
        for side in ("chosen", "rejected"):
            lengths = out[f"{side}_ids"].map(len).clip(lower=1).astype("float64")
            out[f"ref_{side}_mean_logps"] = out[f"ref_{side}_logps"].astype("float64") / lengths
    return out


def prepare_pairs(splits: dict[str, list[dict]], config: Config, *, kind: str, tokenizer, tokenizer_path: str,
                  reference_path: str, pad_token_id: int, cache_dir: Path, log=print,
                  reference_in_data: bool = False) -> PreparedPairs:
    """Tokenize every split's rows of data kind `kind` and attach cached (or freshly scored and cached)
    reference columns. `reference_in_data`: the rows' own reference log-probs are the reference's (the
    loop's judged pairs, `reference_from_rows`): attached as they are, with no scoring pass and no cache."""
    from rayalign.data import write_rows_parquet

    rows = [(name, r) for name, split_rows in splits.items() for r in split_rows]
    fields = TEXT_FIELDS[kind]
    frame = pd.DataFrame({"pair_index": range(len(rows)), **{f: [r[f] for _, r in rows] for f in fields}})
    reference = reference_from_rows([r for _, r in rows], kind) if reference_in_data else None
    if reference_in_data and reference is None:
        log("the rows lack reference log-probs (ref_chosen_logps/ref_rejected_logps or ref_logps): scoring them")
    if reference is not None:
        log(f"reference log-probs of {len(frame)} rows from the data (the judge's pass): no scoring pass")
        out = _encode_and_score(frame, config, kind=kind, tokenizer=tokenizer, reference_path=None,
                                pad_token_id=pad_token_id)
        return _split(with_row_reference(out, reference, kind), rows, splits, cache_path=None, hit=False)
    keys = dict(kind=kind, reference_path=reference_path, tokenizer_path=tokenizer_path)
    path = cache_dir / f"{cache_key(frame, config, **keys)}.parquet"
    hit = config.ref.cache and path.is_file()
    superset = None
    if config.ref.cache and not hit and kind == PAIRS and not needs_dispersion(config.loss):
        # The same pairs scored with the entropies too (a MallowsPO setting of the same sweep): the same
        # log-prob columns plus those, which this loss does not read.
        superset = cache_dir / f"{cache_key(frame, config, **keys, entropy=True)}.parquet"
        if superset.is_file():
            path, hit = superset, True
    if hit:
        # The key covers the tokenizer and the length limits too, so the entry holds the token ids as well:
        # a hit (every Tune trial after the warm-up) runs no Ray Data pass at all.
        log(f"reference cache hit: {path} ({len(frame)} pairs, no tokenization or reference forward needed)")
        out = pd.read_parquet(path).sort_values("pair_index").reset_index(drop=True)
        if path == superset:
            from rayalign.step import ENTROPY_KEYS

            out = out.drop(columns=[key for key in ENTROPY_KEYS if key in out.columns])
    else:
        if config.ref.cache:
            log(f"reference cache miss: scoring {len(frame)} pairs with {config.ref.num_actors} actor(s) -> {path}")
        out = _encode_and_score(frame, config, kind=kind, tokenizer=tokenizer,
                                reference_path=reference_path if config.ref.cache else None, pad_token_id=pad_token_id)
    if config.ref.cache and not hit:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_rows_parquet(out.to_dict("records"), path)  # encoder output: ids, flags, ref_* columns
    return _split(out, rows, splits, cache_path=path if config.ref.cache else None, hit=hit)


def _split(out: pd.DataFrame, rows: list[tuple[str, dict]], splits: dict, *, cache_path: Path | None,
           hit: bool) -> PreparedPairs:
    split_of = [name for name, _ in rows]
    frames = {name: out[[s == name for s in split_of]].reset_index(drop=True) for name in splits}
    return PreparedPairs(frames, int(out["prompt_truncated"].sum()), int(out["completion_truncated"].sum()),
                         cache_path=cache_path, cache_hit=hit)
