"""The chunked output head (`rayalign.core.head`, `rayalign.lm_head`) against the unchunked computation.

Hand-made hidden states and a linear head first: token log-probs, entropies, listed-token log-probs and SPA's
mixed log-probs equal `core.logprobs` / `core.spa` on the full logits, gradients (hidden states and head
weight) to 1e-5, and the head never sees more than `chunk_rows` rows, nor a prompt or padding position.
Then the tiny model through `rayalign.step.sequence_scores`, padded and packed, against `head_chunk_tokens=0`
(the model's own full logits), and a model whose logits are not `lm_head(hidden)` (soft-capping) falling
back to its full logits.
"""

from __future__ import annotations

import copy

import pytest
import torch

from rayalign.core.head import HeadScores, mixed_token_logps
from rayalign.core.logprobs import token_entropy, token_logps
from rayalign.core.spa import mixed_logps

B, T, D, V = 3, 9, 16, 50


class CountingHead(torch.nn.Linear):
    """A linear head that remembers how many rows each call had."""

    def __init__(self, seed: int):
        super().__init__(D, V, bias=False)
        torch.nn.init.normal_(self.weight, std=0.5, generator=torch.Generator().manual_seed(seed))
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return super().forward(x)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64).float().requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.4).long()
    mask[0] = 0  # a row without a completion token
    return hidden, labels, mask


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_token_logps_and_gradients_equal_the_full_logits(temperature):
    hidden, labels, mask = _inputs()
    head = CountingHead(1)
    chunked = HeadScores(hidden, head, vocab_size=V, temperature=temperature, chunk_rows=4).token_logps(labels, mask)
    assert max(head.calls) <= 4 and sum(head.calls) == int(mask.sum())  # completion positions only, in chunks
    full = token_logps(head(hidden) / temperature, labels, mask)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    weights = torch.randn(B, T, generator=torch.Generator().manual_seed(3))  # an arbitrary upstream gradient
    for got, want in zip(_grads((chunked * weights).sum(), hidden, head.weight),
                         _grads((full * weights).sum(), hidden, head.weight)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_entropy_and_listed_token_logps_equal_the_full_logits():
    hidden, labels, mask = _inputs(1)
    head = CountingHead(2)
    scores = HeadScores(hidden, head, vocab_size=V, chunk_rows=5)
    full = head(hidden).detach()
    torch.testing.assert_close(scores.token_entropy(mask), token_entropy(full) * mask, atol=1e-6, rtol=0)
    rows, positions = torch.tensor([0, 2, 1]), torch.tensor([4, 0, 8])
    ids = torch.tensor([[3, 7, 9], [0, 1, 2], [49, 5, 6]])
    got = scores.logps_at(rows, positions, ids)
    want = torch.log_softmax(head(hidden[rows, positions]), -1).gather(-1, ids)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for a, b in zip(_grads(got.sum(), hidden, head.weight), _grads(want.sum(), hidden, head.weight)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_mixed_logps_equal_spa_on_the_full_logits():
    hidden, labels, mask = _inputs(2)
    ref_hidden = hidden.detach() + 0.3 * torch.randn(B, T, D, generator=torch.Generator().manual_seed(4))
    policy_head, ref_head = CountingHead(5), CountingHead(6)
    policy = HeadScores(hidden, policy_head, vocab_size=V, temperature=0.8, chunk_rows=3)
    reference = HeadScores(ref_hidden, ref_head, vocab_size=V, temperature=0.8, chunk_rows=3)
    got = mixed_token_logps(policy, reference, labels, mask, mix=1.5).sum(dim=-1)
    want = mixed_logps(policy_head(hidden).detach() / 0.8, ref_head(ref_hidden).detach() / 0.8, labels, mask, mix=1.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not got.requires_grad


def _scores(model, batch, chunk_rows: int, **kwargs):
    from rayalign.step import sequence_scores

    model.zero_grad(set_to_none=True)
    scores = sequence_scores(model, batch, chunk_rows=chunk_rows, **kwargs)
    (scores.chosen.sum() - 0.5 * scores.rejected_mean.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return scores, grads


@pytest.mark.parametrize("padding_free", [False, True])
def test_sequence_scores_chunked_equal_the_models_full_logits(tiny_model_dir, padding_free):
    from rayalign.config_loader import load_config
    from rayalign.data_kind import PAIRS
    from rayalign.encode import collate
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import encode_pairs
    from rayalign.tasks.sentiment import gold_pairs

    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir)).train()
    config = load_config(None, [f"model.policy={tiny_model_dir}", "data.max_completion_length=24"])
    batch = collate(encode_pairs(gold_pairs(4, seed=3), tokenizer, config).items, PAIRS,
                    pad_token_id=tokenizer.pad_token_id)
    options = {"padding_free": padding_free, "temperature": 0.8, "want_entropy": True}
    chunked, chunked_grads = _scores(model, batch, 7, **options)
    full, full_grads = _scores(model, batch, 0, **options)
    for field in ("chosen", "rejected", "chosen_mean", "rejected_mean", "chosen_entropy", "rejected_entropy"):
        torch.testing.assert_close(getattr(chunked, field), getattr(full, field), atol=1e-5, rtol=0, msg=field)
    assert chunked.vocab_size == full.vocab_size == model.config.vocab_size
    assert chunked_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], atol=1e-5, rtol=0, msg=name)
    assert model.get_output_embeddings().__class__ is torch.nn.Linear  # the head is back in place


def test_a_model_whose_logits_are_not_its_head_falls_back_to_full_logits(tiny_model_dir):
    from rayalign.lm_head import _head_is_plain, forward_scores
    from rayalign.models import load_model

    model = load_model(str(tiny_model_dir))
    capped = copy.deepcopy(model)
    original = capped.forward

    def soft_capped(*args, **kwargs):  # Gemma-2 style: tanh soft-capping after the head
        out = original(*args, **kwargs)
        out.logits = 5.0 * torch.tanh(out.logits / 5.0)
        return out

    capped.forward = soft_capped
    assert _head_is_plain(model) and not _head_is_plain(capped)
    ids = torch.tensor([[5, 9, 11, 2, 7]])
    mask = torch.ones(1, 4, dtype=torch.long)
    got, _ = forward_scores(capped, chunk_rows=2, input_ids=ids)
    with torch.no_grad():
        want = token_logps(capped(input_ids=ids).logits[:, :-1], ids[:, 1:], mask)
    torch.testing.assert_close(got.token_logps(ids[:, 1:], mask), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_completion_logps_are_the_tempered_full_logits_summed_over_the_completion(tiny_model_dir, temperature):
    from rayalign.models import load_model
    from rayalign.step import completion_logps

    model = load_model(str(tiny_model_dir)).eval()
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14, 15]]
    got = completion_logps(model, prompts, completions, pad_token_id=0, chunk_rows=3, temperature=temperature)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0].double() / temperature, dim=-1)
        expected = sum(float(logps[len(prompt) - 1 + i, token]) for i, token in enumerate(completion))
        assert float(got[row]) == pytest.approx(expected, abs=1e-4)
