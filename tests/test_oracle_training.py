"""The in-process oracle trainer on the tiny model: it learns, and how a batch is split does not matter."""

from __future__ import annotations

import copy

import pytest
import torch

from rayalign.config_loader import load_config
from rayalign.oracle import train_pairs
from rayalign.tasks.sentiment import gold_pairs

BASE = ["optim.lr=5e-4", "optim.warmup_ratio=0", "optim.scheduler=constant", "data.max_completion_length=48"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from rayalign.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def _train(tiny, overrides, rows, dtype=torch.float32):
    model, tokenizer = tiny
    model = copy.deepcopy(model).to(dtype)
    policy, reference = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
    history = train_pairs(policy, reference, tokenizer, rows, load_config(None, BASE + overrides))
    return policy, history


def test_every_parameter_changes_after_one_step(tiny):
    before = {n: p.detach().clone() for n, p in tiny[0].named_parameters()}
    policy, history = _train(tiny, ["train.global_batch_size=8", "train.max_steps=1"], gold_pairs(8, seed=1))
    assert len(history) == 1
    for name, param in policy.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"


def test_a_non_finite_gradient_norm_stops_before_the_step(tiny):
    model, tokenizer = tiny
    policy, reference = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    policy.get_input_embeddings().weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    config = load_config(None, BASE + ["train.global_batch_size=8", "train.max_steps=1"])
    with pytest.raises(FloatingPointError, match="non-finite gradient norm"):
        train_pairs(policy, reference, tokenizer, gold_pairs(8, seed=1), config)
    for name, param in policy.named_parameters():
        assert torch.equal(param, before[name]), f"{name} changed: a step was taken on an inf gradient"


def test_train_reward_accuracy_rises(tiny):
    _, history = _train(tiny, ["train.global_batch_size=16", "train.epochs=4"], gold_pairs(32, seed=2))
    first, last = history[0], history[-1]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: log 2
    assert last["rewards/accuracies"] >= 0.75 and last["rewards/margins"] > 0.1
    assert sum(h["loss"] for h in history[-2:]) < sum(h["loss"] for h in history[:2])


def test_batch_split_invariance(tiny):
    """1 x 4 accumulation == 2 workers x 2 == 4 x 1 == unsplit: the global batch gradient is one sum.

    In float64, so the comparison is tight: in float32 Adam amplifies rounding in near-zero gradients
    (padding to different lengths changes matmul shapes) to ~6e-6 after two steps at lr 5e-4.
    """
    rows = gold_pairs(16, seed=3)
    splits = [["train.num_workers=1", "train.gradient_accumulation_steps=1"],
              ["train.num_workers=1", "train.gradient_accumulation_steps=4"],
              ["train.num_workers=2", "train.gradient_accumulation_steps=2"],
              ["train.num_workers=4", "train.gradient_accumulation_steps=1"]]
    results = [_train(tiny, ["train.global_batch_size=8", "train.max_steps=2", *s], rows, torch.float64)
               for s in splits]
    reference_policy, reference_history = results[0]
    for policy, history in results[1:]:
        assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in reference_history], abs=1e-12)
        for (name, a), b in zip(reference_policy.named_parameters(), policy.parameters()):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize(
    "overrides",
    [["loss.type=ipo"], ["loss.type=hinge"], ["loss.type=exo_pref"],
     ["loss.type=mallows_theta", "loss.mallows_scale=auto"], ["loss.type=mallows_phi", "loss.mallows_phi=0.5"]],
)
def test_every_in_process_loss_trains(tiny, overrides):
    _, history = _train(tiny, [*overrides, "train.global_batch_size=8", "train.epochs=2"], gold_pairs(16, seed=4))
    assert len(history) == 4
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"]


def test_mallows_phi_from_entropy_brakes_an_uncertain_model(tiny):
    """An untrained model is near-uniform: H ~ 1, so phi = exp(-k) ~ 1 (no consensus) and the Mallows-phi
    link is almost flat: margins move far less than under DPO with the same steps (ALGORITHMS.md §2)."""
    rows, common = gold_pairs(16, seed=4), ["train.global_batch_size=8", "train.epochs=2"]
    _, mallows = _train(tiny, ["loss.type=mallows_phi", *common], rows)
    _, dpo = _train(tiny, ["loss.type=dpo", *common], rows)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in mallows)
    assert abs(mallows[-1]["rewards/margins"]) < abs(dpo[-1]["rewards/margins"])


def test_group_losses_are_refused_clearly(tiny):
    from rayalign.config import ConfigError

    with pytest.raises(ConfigError, match="exo_rw trains on K-sample groups"):  # not on pairs
        _train(tiny, ["loss.type=exo_rw"], gold_pairs(4, seed=0))


def test_spa_refinement_in_the_oracle(tiny):
    """spa.refine=true used to be ignored by the oracle (plain DPO, no spa/* metrics). Now, as on the Ray
    workers: DPO until the warm start is over, then soft labels on the pairs at or below the window's tau."""
    rows = gold_pairs(16, seed=3)
    common = ["train.global_batch_size=4", "spa.window=8", "spa.k_fraction=0.25",
              "spa.warm_start=0.3", "spa.alpha=0.3"]
    plain_policy, plain = _train(tiny, common, rows)
    refined_policy, refined = _train(tiny, [*common, "spa.refine=true"], rows)
    assert [h["spa/active"] for h in refined] == [0, 0, 1, 1]  # 4 steps; ceil(0.3 x 4) = 2 warm-up steps
    assert refined[0]["spa/threshold"] == 0.0 and refined[2]["spa/threshold"] != 0.0  # full after 2 x 4 pairs
    assert all(h["spa/relabelled"] == 0 for h in refined[:2]) and sum(h["spa/relabelled"] for h in refined) > 0
    # Equal up to rounding: the two losses' gradients differ in their last bits, which Adam turns into weight
    # differences (step 2: 6e-7 to 1.1e-6 by the attention kernel); the soft labels move the loss by ~3e-2.
    assert [h["loss"] for h in refined[:2]] == pytest.approx([h["loss"] for h in plain[:2]], abs=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(refined_policy.parameters(), plain_policy.parameters()))
