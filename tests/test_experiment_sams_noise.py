"""`experiments/sams_noise.py` at toy size (CI): every arm runs, the selection bookkeeping is exact, outputs land.

With rho = 1 every selector chooses every pair, so the flipped share of what it chose must be exactly the
flipped fraction of the data; the DPO arms have no selection to report.
"""

from __future__ import annotations

import json

import pytest

from experiments import sams_noise


def test_toy_run_reports_every_arm_and_exact_flip_shares(tmp_path):
    out = tmp_path / "sams"
    summary = sams_noise.main(["--seeds", "1", "--pairs", "20", "--heldout", "8", "--epochs", "1", "--batch", "10",
                               "--ratios", "1.0", "0.5", "--sft-examples", "64", "--out", str(out)])
    rows = {row["arm"]: row for row in summary}
    assert list(rows) == ["dpo_clean", "dpo", "sams@1", "random@1", "top_rs@1", "sams@0.5", "random@0.5",
                          "top_rs@0.5"]
    for name in ("sams@1", "random@1", "top_rs@1"):
        assert rows[name]["flipped_share"] == pytest.approx(4 / 20) and rows[name]["backward_pairs"] == 20
    for name in ("sams@0.5", "random@0.5", "top_rs@0.5"):
        assert rows[name]["backward_pairs"] == 10 and 0.0 <= rows[name]["flipped_share"] <= 1.0
    assert all(rows[n]["flipped_share"] != rows[n]["flipped_share"] for n in ("dpo", "dpo_clean"))  # NaN
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in summary)
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["runs"]) == 8 and (out / "sams_noise.png").stat().st_size > 0


def test_noisy_pairs_flip_exactly_the_named_pairs():
    clean, noisy, flipped = sams_noise.noisy_pairs(50, noise=0.2, seed=3)
    assert len(flipped) == 10
    for i, (a, b) in enumerate(zip(clean, noisy, strict=True)):
        swapped = (a["chosen"], a["rejected"]) == (b["rejected"], b["chosen"])
        assert swapped == (i in flipped) and a["prompt"] == b["prompt"]
