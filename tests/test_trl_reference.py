"""TRL 1.16 as an independent numerical reference for dpo (ε=0), ipo, hinge and exo_pref.

TRL has no standalone loss function: every `loss_type` is inline in `DPOTrainer._compute_loss`. We call
that method unbound, with a `SimpleNamespace` standing in for the trainer and a model stub that returns
per-token log-probs, on a random batch; our losses on the same log-probs must give the same numbers.
cDPO (ε > 0) has no TRL 1.16 reference (its `sigmoid` no longer smooths): it is checked against the
formula in test_losses.py. This pins TRL's private API: it targets trl==1.16.0 exactly.
"""

import collections
import types

import pytest
import torch

from rayalign.core import losses as L
from rayalign.core.logprobs import sequence_logps, shift_for_causal_lm

# A guard only: trl==1.16.0 is a dev dependency and installed in CI.
DPOTrainer = pytest.importorskip("trl.trainer.dpo_trainer").DPOTrainer

BATCH, LENGTH, VOCAB = 4, 9, 13


class LogProbModel:
    """Stands in for the model under TRL's fused LM head: returns per-token log-probs of the labels.

    TRL calls `model(input_ids, attention_mask, use_cache, labels, fused_lm_head)` with labels = input_ids
    where the completion mask is 1 and −100 elsewhere, and reads `log_probs[:, -(T−1):]` plus a few
    metric fields. The log-probs here are computed independently of rayalign (explicit log_softmax).
    """

    training = False

    def __init__(self, logits: torch.Tensor):
        self.logits = logits  # (2B, T, V) for [chosen; rejected]

    def __call__(self, *, input_ids, labels, **_):
        shifted = labels[:, 1:]
        keep = shifted != -100
        logp = torch.log_softmax(self.logits[:, :-1].double(), dim=-1)
        picked = logp.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        per_token = torch.where(keep, picked, torch.zeros_like(picked))
        return types.SimpleNamespace(
            log_probs=per_token,
            entropy=torch.zeros_like(per_token),
            mean_logits=torch.zeros_like(per_token),
            is_top1=torch.zeros_like(per_token, dtype=torch.bool),
        )


def _trainer_stub(model, loss_type: str, beta: float, label_smoothing: float):
    """The attributes `_compute_loss` reads, with identity gathers (one process)."""
    return types.SimpleNamespace(
        model=model,
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=1.0,
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=types.SimpleNamespace(discopop_tau=0.05),
    )


def _random_inputs(seed: int):
    """Chosen and rejected rows of one padded batch with prompts of 2–3 tokens and ragged completions."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2 * BATCH, LENGTH), generator=g)
    attention_mask = torch.ones(2 * BATCH, LENGTH, dtype=torch.long)
    completion_mask = torch.zeros(2 * BATCH, LENGTH, dtype=torch.long)
    for row in range(2 * BATCH):
        prompt = 2 + row % 2
        end = LENGTH - (row % 3)
        completion_mask[row, prompt:end] = 1
        attention_mask[row, end:] = 0
    policy_logits = torch.randn(2 * BATCH, LENGTH, VOCAB, generator=g, dtype=torch.float64) * 2
    ref_logits = torch.randn(2 * BATCH, LENGTH, VOCAB, generator=g, dtype=torch.float64) * 2
    return input_ids, attention_mask, completion_mask, policy_logits, ref_logits


def _ours_and_trl(loss_type: str, beta: float, label_smoothing: float, seed: int):
    input_ids, attention_mask, completion_mask, policy_logits, ref_logits = _random_inputs(seed)
    aligned = shift_for_causal_lm(policy_logits, input_ids, completion_mask)
    ref_aligned = shift_for_causal_lm(ref_logits, input_ids, completion_mask)
    average = loss_type == "ipo"  # TRL's ipo normalises per token; its other losses use sums
    policy = sequence_logps(*aligned, average=average).chunk(2)
    ref = sequence_logps(*ref_aligned, average=average).chunk(2)
    ref_sums = sequence_logps(*ref_aligned).chunk(2)  # TRL takes the precomputed reference as sums

    ours_fn = {"sigmoid": L.dpo_loss, "ipo": L.ipo_loss, "hinge": L.hinge_loss, "exo_pair": L.exo_pref_loss}[
        loss_type
    ]
    kwargs = {"label_smoothing": label_smoothing} if loss_type in ("sigmoid", "exo_pair") else {}
    ours = ours_fn(*policy, *ref, beta=beta, **kwargs).losses

    trl_losses = []
    model = LogProbModel(policy_logits)
    stub = _trainer_stub(model, loss_type, beta, label_smoothing)
    # Whole batch (TRL returns the mean), then row by row for per-example agreement.
    rows = [slice(0, BATCH)] + [slice(i, i + 1) for i in range(BATCH)]
    for rows_ in rows:
        both = torch.cat([torch.arange(2 * BATCH)[:BATCH][rows_], torch.arange(2 * BATCH)[BATCH:][rows_]])
        inputs = {
            "input_ids": input_ids[both],
            "attention_mask": attention_mask[both],
            "completion_mask": completion_mask[both],
            "ref_chosen_logps": ref_sums[0][rows_],
            "ref_rejected_logps": ref_sums[1][rows_],
        }
        model.logits = policy_logits[both]
        trl_losses.append(DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False))
    return ours, trl_losses[0], torch.stack(trl_losses[1:])


@pytest.mark.parametrize(
    "loss_type,beta,label_smoothing",
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 0.5, 0.0),
        ("ipo", 0.1, 0.0),
        ("ipo", 0.3, 0.0),
        ("hinge", 0.1, 0.0),
        ("hinge", 0.05, 0.0),
        ("exo_pair", 0.1, 1e-3),
        ("exo_pair", 0.5, 0.2),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_losses_equal_trl(loss_type, beta, label_smoothing, seed):
    ours, trl_mean, trl_rows = _ours_and_trl(loss_type, beta, label_smoothing, seed)
    assert ours.shape == (BATCH,)
    torch.testing.assert_close(ours.mean(), trl_mean.to(ours.dtype), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours, trl_rows.to(ours.dtype), atol=1e-6, rtol=1e-6)


def test_hinge_reference_covers_both_sides_of_the_kink():
    """The random batch must exercise hinge's active (u < 1) and saturated (u ≥ 1) regions, or the
    agreement above would not test the kink."""
    ours, _, _ = _ours_and_trl("hinge", 0.5, 0.0, 0)
    assert (ours == 0).any() and (ours > 0).any()
