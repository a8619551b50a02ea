"""Ray Data preparation of preference pairs: tokenize, then score with the reference once, cache as Parquet.

    rows -> map_batches(PairEncoder) -> [cache hit? read : map_batches(ReferenceScorer, actor pool) -> write]

The reference log-probs (and, for MallowsPO, mean entropies) depend only on the reference model, the
token ids and the scoring settings, so they are stored under `ref_cache/<hash>.parquet`, keyed by a hash
of exactly those, and reused by any later run that agrees on all three (the log says so). The training
workers read the prepared Parquet; nothing here trains.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rayalign.batching import collate_pairs, encode_pair
from rayalign.config import Config
from rayalign.objective import needs_dispersion

ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
CACHE_VERSION = 1  # bump when the scoring code changes what it computes


class PairEncoder:
    """Ray Data callable class: text pairs -> token ids and truncation flags (pandas batches)."""

    def __init__(self, tokenizer_path: str, max_prompt_length: int, max_completion_length: int,
                 trust_remote_code: bool = False):
        from rayalign.models import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
        self.lengths = {"max_prompt_length": max_prompt_length, "max_completion_length": max_completion_length}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        encoded = [encode_pair(self.tokenizer, p, c, r, **self.lengths)
                   for p, c, r in zip(batch["prompt"], batch["chosen"], batch["rejected"])]
        out = pd.DataFrame(encoded)
        out.insert(0, "pair_index", batch["pair_index"].to_numpy())
        return out


class ReferenceScorer:
    """Ray Data callable class: token ids -> reference log-probs (and entropies), no gradient."""

    def __init__(self, reference_path: str, config: Config, pad_token_id: int):
        import torch

        from rayalign.models import load_model

        torch.set_num_threads(max(1, int(os.environ.get("RAYALIGN_SCORER_THREADS", torch.get_num_threads()))))
        self.model = load_model(reference_path, trust_remote_code=config.model.trust_remote_code,
                                dtype=config.model.dtype)
        self.config, self.pad_token_id = config, pad_token_id
        self.want_entropy = needs_dispersion(config.loss)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from rayalign.step import reference_scores

        encoded = [{k: list(row[k]) for k in ID_COLUMNS} for _, row in batch.iterrows()]
        scores = reference_scores(self.model, collate_pairs(encoded, pad_token_id=self.pad_token_id), self.config,
                                  want_entropy=self.want_entropy)
        out = batch[["pair_index"]].copy()
        for key, value in scores.items():
            out[key] = value.double().numpy()
        return out


def fingerprint_model(path: str) -> str:
    """Config content plus name, size and mtime of every file of a local model dir (a hub id: the id)."""
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


def cache_key(reference_path: str, encoded: pd.DataFrame, config: Config) -> str:
    """Hash of (reference model, token ids, scoring settings): what the cached values depend on."""
    digest = hashlib.sha256()
    settings = {"version": CACHE_VERSION, "model": fingerprint_model(reference_path), "dtype": config.model.dtype,
                "temperature": config.loss.logit_temperature, "padding_free": config.train.padding_free,
                "entropy": needs_dispersion(config.loss)}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for column in ID_COLUMNS:
        for ids in encoded[column]:
            digest.update(b"|" + ",".join(map(str, ids)).encode())
    return digest.hexdigest()[:24]


@dataclass
class PreparedPairs:
    frame: pd.DataFrame  # pair_index, ids, truncation flags, ref_* columns when cached
    prompts_truncated: int
    completions_truncated: int
    cache_path: Path | None
    cache_hit: bool


def _ray_dataset(frame: pd.DataFrame):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # row i of the output is pair i
    return ray.data.from_pandas(frame)


def tokenize_pairs(rows: list[dict], config: Config, tokenizer_path: str) -> pd.DataFrame:
    """Token ids of every pair, computed by a Ray Data `map_batches` over `PairEncoder`."""
    frame = pd.DataFrame({"pair_index": range(len(rows)), "prompt": [r["prompt"] for r in rows],
                          "chosen": [r["chosen"] for r in rows], "rejected": [r["rejected"] for r in rows]})
    encoder_args = (tokenizer_path, config.data.max_prompt_length, config.data.max_completion_length,
                    config.model.trust_remote_code)
    import ray

    dataset = _ray_dataset(frame).map_batches(
        PairEncoder, fn_constructor_args=encoder_args, batch_format="pandas", batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    return dataset.to_pandas().sort_values("pair_index").reset_index(drop=True)


def score_reference(encoded: pd.DataFrame, config: Config, reference_path: str, pad_token_id: int) -> pd.DataFrame:
    """Reference columns for every pair, by an actor pool of `ref.num_actors` `ReferenceScorer`s."""
    import ray

    dataset = _ray_dataset(encoded[["pair_index", *ID_COLUMNS]]).map_batches(
        ReferenceScorer, fn_constructor_args=(reference_path, config, pad_token_id), batch_format="pandas",
        batch_size=config.ref.batch_size, compute=ray.data.ActorPoolStrategy(size=config.ref.num_actors),
        num_cpus=1)
    return dataset.to_pandas().sort_values("pair_index").reset_index(drop=True)


def prepare_pairs(rows: list[dict], config: Config, *, tokenizer_path: str, reference_path: str,
                  pad_token_id: int, cache_dir: Path, log=print) -> PreparedPairs:
    """Tokenize `rows`, and attach cached (or freshly cached) reference columns when `ref.cache`."""
    from rayalign.data import write_rows_parquet

    encoded = tokenize_pairs(rows, config, tokenizer_path)
    flags = (int(encoded["prompt_truncated"].sum()), int(encoded["completion_truncated"].sum()))
    if not config.ref.cache:
        return PreparedPairs(encoded, *flags, cache_path=None, cache_hit=False)
    path = cache_dir / f"{cache_key(reference_path, encoded, config)}.parquet"
    hit = path.is_file()
    if hit:
        log(f"reference cache hit: {path} ({len(encoded)} pairs, no reference forward needed)")
        scores = pd.read_parquet(path)
    else:
        log(f"reference cache miss: scoring {len(encoded)} pairs with {config.ref.num_actors} actor(s) -> {path}")
        scores = score_reference(encoded, config, reference_path, pad_token_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_rows_parquet(scores.to_dict("records"), path)
    frame = encoded.merge(scores, on="pair_index", how="left", validate="one_to_one")
    return PreparedPairs(frame, *flags, cache_path=path, cache_hit=hit)
