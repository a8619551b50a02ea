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

PAIRS = "pairs"
LEVEL_PAIRS = "level_pairs"
BELIEFS = "beliefs"
GROUPS = "groups"
KINDS = (PAIRS, LEVEL_PAIRS, BELIEFS, GROUPS)
LEVEL_KINDS = (LEVEL_PAIRS, BELIEFS)  # rows that carry level digits and a target p* (the alignment gap)
