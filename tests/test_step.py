"""The shared micro-batch step: padding-free packing equals the padded path; cached == in-step reference."""

from __future__ import annotations

import copy

import pytest
import torch

from rayalign.config_loader import load_config
from rayalign.data_kind import PAIRS
from rayalign.encode import collate_with_reference
from rayalign.oracle import encode_pairs, reference_columns
from rayalign.step import micro_batch_loss, pack_pairs, sequence_scores
from rayalign.tasks.sentiment import gold_pairs


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from rayalign.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def _batch(tiny, n=6, seed=0):
    model, tokenizer = tiny
    config = load_config(None, ["data.max_completion_length=40"])
    encoded = encode_pairs(gold_pairs(n, seed=seed), tokenizer, config).items
    return encoded, config


def test_pack_pairs_restarts_positions_and_keeps_only_real_tokens(tiny):
    encoded, _ = _batch(tiny, n=3)
    from rayalign.batching import collate_pairs

    batch = collate_pairs(encoded, pad_token_id=tiny[1].pad_token_id)
    packed = pack_pairs(batch)
    real = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    assert packed["input_ids"].shape == (1, real)
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 6 and starts[0] == 0
    assert packed["completion_mask"].sum() == batch["chosen_completion_mask"].sum() + batch[
        "rejected_completion_mask"].sum()


def test_padding_free_equals_padded_per_example(tiny):
    model, tokenizer = tiny
    encoded, config = _batch(tiny)
    from rayalign.batching import collate_pairs

    batch = collate_pairs(encoded, pad_token_id=tokenizer.pad_token_id)
    padded = sequence_scores(model, batch, want_entropy=True)
    packed = sequence_scores(model, batch, padding_free=True, want_entropy=True)
    for name in ("chosen", "rejected", "chosen_mean", "rejected_mean", "chosen_entropy", "rejected_entropy"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_padding_free_loss_and_gradient_equal_padded(tiny, loss):
    model, tokenizer = tiny
    encoded, _ = _batch(tiny, seed=1)
    policy = copy.deepcopy(model)
    with torch.no_grad():  # move the policy away from the reference so the loss is not log 2 everywhere
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    results = []
    for padding_free in (False, True):
        config = load_config(None, [f"loss.type={loss}", f"train.padding_free={padding_free}"])
        columns = reference_columns(model, encoded, pad_token_id=tokenizer.pad_token_id, config=config)
        index = torch.arange(len(encoded))
        batch = collate_with_reference(encoded, columns, index, kind=PAIRS, pad_token_id=tokenizer.pad_token_id)
        policy.zero_grad()
        out = micro_batch_loss(policy, batch, config)
        out.losses.sum().backward()
        results.append((out.losses.detach(), [p.grad.clone() for p in policy.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_in_step_reference_equals_cached(tiny):
    model, tokenizer = tiny
    encoded, config = _batch(tiny, seed=2)
    columns = reference_columns(model, encoded, pad_token_id=tokenizer.pad_token_id, config=config)
    cached = collate_with_reference(encoded, columns, torch.arange(len(encoded)), kind=PAIRS,
                                    pad_token_id=tokenizer.pad_token_id)
    bare = {k: v for k, v in cached.items() if not k.startswith("ref_")}
    a = micro_batch_loss(model, cached, config).losses
    b = micro_batch_loss(model, bare, config, reference=model).losses
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="no cached reference"):
        micro_batch_loss(model, bare, config)


def test_weights_and_soft_labels(tiny):
    model, tokenizer = tiny
    encoded, config = _batch(tiny, n=4, seed=3)
    columns = reference_columns(model, encoded, pad_token_id=tokenizer.pad_token_id, config=config)
    batch = collate_with_reference(encoded, columns, torch.arange(4), kind=PAIRS, pad_token_id=tokenizer.pad_token_id)
    plain = micro_batch_loss(model, batch, config).losses
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5])
    torch.testing.assert_close(micro_batch_loss(model, batch, config, weights=weights).losses, plain * weights)
    # policy == reference: u = 0, so any label smoothing gives log 2 (ALGORITHMS.md §1 sanity)
    soft = micro_batch_loss(model, batch, config, label_smoothing=torch.full((4,), 0.1)).losses
    torch.testing.assert_close(soft, torch.full((4,), float(torch.log(torch.tensor(2.0)))))


def test_spa_refinement_in_the_step(tiny):
    """Policy == reference: every mixed logit equals the reference's, so each margin is 0 (to rounding:
    the cached reference values come from other batch shapes) <= tau = 1e-3 and, once active, every pair
    gets eps = alpha."""
    from rayalign.core.logprobs import concatenated_forward
    from rayalign.core.spa import mixed_logps
    from rayalign.step import PAIR_KEYS, RefineSettings

    model, tokenizer = tiny
    encoded, config = _batch(tiny, n=4, seed=5)
    columns = reference_columns(model, encoded, pad_token_id=tokenizer.pad_token_id, config=config)
    batch = collate_with_reference(encoded, columns, torch.arange(4), kind=PAIRS, pad_token_id=tokenizer.pad_token_id)
    on = RefineSettings(mix=1.5, threshold=1e-3, alpha=0.1, active=True)
    out = micro_batch_loss(model, batch, config, reference=model, refine=on)
    torch.testing.assert_close(out.refine_margins, torch.zeros(4), atol=1e-4, rtol=0)
    assert out.relabelled == 4
    off = micro_batch_loss(model, batch, config, reference=model, refine=RefineSettings(1.5, 1e-3, 0.1, False))
    assert off.relabelled == 0

    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out = micro_batch_loss(policy, batch, config, reference=model, refine=on)
    with torch.no_grad():  # the margins from an independent computation of the de-coupled model
        pol = concatenated_forward(policy, *(batch[k] for k in PAIR_KEYS), return_logits=True)
        ref = concatenated_forward(model, *(batch[k] for k in PAIR_KEYS), return_logits=True)
        mixed = mixed_logps(pol.logits, ref.logits, pol.labels, pol.mask, mix=1.5)
    chosen, rejected = mixed.chunk(2)
    expected = 0.1 * ((chosen - rejected) - (ref.chosen_logps - ref.rejected_logps))
    torch.testing.assert_close(out.refine_margins, expected, atol=1e-4, rtol=1e-4)
    assert out.relabelled == int((expected <= 1e-3).sum())
