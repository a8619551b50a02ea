"""SamS inside the training step: the oracle's properties, then Ray Train workers against the oracle.

The spec's sanity list (ALGORITHMS.md §6): exactly K pairs selected each step; with rho = 1 the step equals
plain DPO; selection is deterministic given the seed; the scheduler state round-trips through a checkpoint
(here: a worker is killed mid-run and the restarted group continues the same rounds).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rayalign.config_loader import load_config
from rayalign.tasks.sentiment import gold_pairs
from tests.test_train_ray import assert_same_weights, metrics, pairs_file, train, weights  # noqa: F401

SAMS = ["sams.enabled=true", "train.gradient_accumulation_steps=1"]


def _oracle(tiny_model_dir, *overrides, pairs: int = 24):
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import train_pairs

    config = load_config(None, [f"model.policy={tiny_model_dir}", "optim.lr=5e-4", "optim.warmup_ratio=0",
                                "optim.scheduler=constant", "train.global_batch_size=8", "train.epochs=2",
                                "data.max_completion_length=48", *overrides])
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    reference = copy.deepcopy(model).requires_grad_(False)
    history = train_pairs(model, reference, tokenizer, gold_pairs(pairs, seed=11), config)
    return history, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict, atol: float) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_ratio_one_is_plain_dpo(tiny_model_dir):
    plain, plain_weights = _oracle(tiny_model_dir, "train.padding_free=false")  # SamS's forward is padded
    full, full_weights = _oracle(tiny_model_dir, *SAMS, "sams.ratio=1.0")
    assert [h["sams/selected"] for h in full] == [8, 8, 8, 8, 8, 8]
    assert [h["loss"] for h in full] == pytest.approx([h["loss"] for h in plain], abs=1e-6)
    _same(full_weights, plain_weights, atol=1e-6)


@pytest.mark.parametrize("selector", ["bandit", "random", "top_rs"])
def test_exactly_k_pairs_and_deterministic(tiny_model_dir, selector):
    args = (*SAMS, "sams.ratio=0.4", f"sams.selector={selector}", "sams.warmup_fraction=0.2")
    first, first_weights = _oracle(tiny_model_dir, *args, pairs=20)
    again, again_weights = _oracle(tiny_model_dir, *args, pairs=20)
    # 20 pairs in batches of 8, 8, 4 per epoch: K = ceil(0.4 n) = 4, 4, 2
    assert [h["sams/selected"] for h in first] == [4, 4, 2] * 2
    assert [h["loss"] for h in first] == [h["loss"] for h in again]
    _same(first_weights, again_weights, atol=0)
    if selector == "bandit":  # two warm-up rounds (20% of 6 steps) with random choice, then the networks
        assert [h["sams/warmup"] for h in first] == [1, 1, 0, 0, 0, 0]
        assert all(math.isfinite(h["sams/fit_loss"]) for h in first[1:])


def test_selectors_choose_differently(tiny_model_dir):
    _, random_weights = _oracle(tiny_model_dir, *SAMS, "sams.selector=random")
    _, top_weights = _oracle(tiny_model_dir, *SAMS, "sams.selector=top_rs")
    assert any(not torch.equal(random_weights[k], top_weights[k]) for k in random_weights)


def test_config_rejects_accumulation_with_sams(tiny_model_dir):
    from rayalign.config import ConfigError

    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        load_config(None, ["sams.enabled=true", "train.gradient_accumulation_steps=2"])


@pytest.mark.slow
@pytest.mark.usefixtures("in_process_ray")
def test_ray_workers_match_the_oracle_and_resume_the_scheduler(tiny_model_dir, pairs_file, tmp_path,  # noqa: F811
                                                               monkeypatch):
    """2 Ray workers == the oracle; then the memory-saving `regrad` variant with rank 1 killed before step 4
    (Ray restarts the group from the step-2 checkpoint, scheduler state included) ends at the same weights."""
    from rayalign.data import load_rows
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import train_pairs
    from rayalign.train import split_eval

    args = (*SAMS, "sams.warmup_fraction=0.2", "sams.ratio=0.5")
    straight = tmp_path / "straight"
    assert train(tiny_model_dir, pairs_file, straight, *args) == 0
    steps = metrics(straight)
    assert [m["sams/selected"] for m in steps] == [4] * 6
    config = load_config(straight / "config.yaml")
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    rows, _ = split_eval(load_rows(config.data.train_file).rows, config, tokenizer)
    history = train_pairs(model, copy.deepcopy(model).requires_grad_(False), tokenizer, rows, config)
    assert [h["loss"] for h in history] == pytest.approx([m["loss"] for m in steps], abs=1e-5)
    for name, value in weights(straight / "final").items():
        torch.testing.assert_close(value, model.state_dict()[name], atol=2e-5, rtol=0, msg=name)

    monkeypatch.setenv("RAYALIGN_KILL_WORKER_AT", "4:1")
    killed = tmp_path / "killed"
    assert train(tiny_model_dir, pairs_file, killed, *args, "sams.regrad=true", "train.max_failures=1") == 0
    assert (killed / ".killed-step4-rank1").exists()
    kept = sorted((killed / "checkpoints").glob("step-*"))
    assert kept and all((c / "sams.pt").is_file() for c in kept), kept  # the scheduler's state in each
    assert [m["loss"] for m in metrics(killed)][-1] == pytest.approx(steps[-1]["loss"], abs=1e-5)
    assert_same_weights(killed / "final", straight / "final", atol=2e-5)
