"""The kinds of training data, named once: pairs, K-sample groups, GDPO beliefs.

    PAIRS        {prompt, chosen, rejected}: every pairwise loss
    LEVEL_PAIRS  pairs made from GDPO rows (`batching.gdpo_rows_as_pairs`) for the DPO baseline: trained as
                 pairs, but they keep the belief target so the evaluation reports GDPO's alignment gap
    BELIEFS      GDPO rows kept whole (loss.type=gdpo): belief prefix, level digits, target p*
    GROUPS       {prompt, completions[K], rewards[K]}: the K-sample losses (exo_rw, dpo_rw)

The kind is decided once per training run, by `decide` from the loss and the data's format, and then
passed to the code that encodes, collates and scores the data: none of it guesses the kind from the keys
of a row or a batch. Torch-free (the config and the driver read it).
"""

from __future__ import annotations

from rayalign.config_checks import ConfigError

PAIRS = "pairs"
LEVEL_PAIRS = "level_pairs"
BELIEFS = "beliefs"
GROUPS = "groups"
KINDS = (PAIRS, LEVEL_PAIRS, BELIEFS, GROUPS)
LEVEL_KINDS = (LEVEL_PAIRS, BELIEFS)  # rows that carry level digits and a target p* (the alignment gap)
LEVEL_TARGET = "level_target"  # a LEVEL_PAIRS row's p*: not trained on, read by the eval's alignment gap


def decide(loss, fmt: str, source: str) -> str:
    """The data kind a run trains on, from its loss (a `rayalign.loss_registry.LossSpec`) and the format of
    its data (`rayalign.data.FORMATS`) in `source`; a ConfigError naming the key when they do not fit."""
    from rayalign.data.formats import PAIR_FORMATS

    if loss.data == GROUPS:
        if fmt != "k_sample":
            raise ConfigError(f"loss.type: {loss.name} trains on K-sample groups ({{prompt, completions, rewards}} "
                              f"rows); {source} holds {fmt} rows")
        return GROUPS
    if loss.data == BELIEFS and fmt != "gdpo":
        raise ConfigError(f"loss.type: {loss.name} needs data in the GDPO belief format; {source} is {fmt}")
    if fmt == "gdpo":
        return BELIEFS if loss.data == BELIEFS else LEVEL_PAIRS
    if fmt not in PAIR_FORMATS:
        raise ConfigError(f"data.train_file: {source} holds {fmt} rows; training needs pairs "
                          f"({', '.join(PAIR_FORMATS)}) or GDPO rows")
    return PAIRS


def of_rows(loss, rows: list[dict], source: str = "the rows given") -> str:
    """`decide` for rows handed over in memory (the in-process oracle, experiments): their format is what
    `rayalign.data.detect_format` says of the first row; pairs made by `gdpo_rows_as_pairs` are LEVEL_PAIRS."""
    from rayalign.data.formats import detect_format

    if not rows:
        raise ConfigError(f"data.train_file: {source} holds no rows")
    if loss.data == PAIRS and rows[0].get(LEVEL_TARGET) is not None:
        return LEVEL_PAIRS
    return decide(loss, detect_format(rows[0]), source)
