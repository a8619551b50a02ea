"""Entropy with zero-probability vocabulary entries: H = −Σ p log p counts p = 0 terms as 0, not NaN.

A logit of −inf (a banned or masked token) gives p = 0 and log p = −inf; 0 · (−inf) is NaN in floating
point. The padded path (`core.logprobs.sequence_mean_entropy`) had the guard; the padding-free (packed)
path of `rayalign.step` did not. Both now call `core.logprobs.token_entropy` and agree.
"""

from __future__ import annotations

import math

import pytest
import torch

from rayalign.core.logprobs import token_entropy


def test_token_entropy_counts_zero_probabilities_as_zero():
    logits = torch.tensor([[0.0, 0.0, -math.inf, 0.0], [1.0, -math.inf, -math.inf, -math.inf]])
    torch.testing.assert_close(token_entropy(logits), torch.tensor([math.log(3), 0.0]))


class BannedToken(torch.nn.Module):
    """A causal LM whose logit for one vocabulary entry is −inf everywhere (as a logits processor does)."""

    def __init__(self, inner: torch.nn.Module, banned: int):
        super().__init__()
        self.inner, self.banned = inner, banned

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        out.logits[..., self.banned] = -math.inf
        return out


@pytest.fixture(scope="module")
def model_and_batch(tiny_model_dir):
    from rayalign.batching import collate_pairs
    from rayalign.config_loader import load_config
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import encode_pairs
    from rayalign.tasks.sentiment import gold_pairs

    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    config = load_config(None, ["data.max_completion_length=40"])
    batch = collate_pairs(encode_pairs(gold_pairs(4, seed=0), tokenizer, config).items,
                          pad_token_id=tokenizer.pad_token_id)
    used = set(torch.cat([batch["chosen_input_ids"].flatten(), batch["rejected_input_ids"].flatten()]).tolist())
    banned = next(i for i in range(model.config.vocab_size) if i not in used)  # never a label: log-probs stay finite
    return BannedToken(model, banned), batch


def test_padding_free_entropy_with_a_zero_probability_token_equals_the_padded_one(model_and_batch):
    from rayalign.step import sequence_scores

    model, batch = model_and_batch
    with torch.no_grad():
        padded = sequence_scores(model, batch, want_entropy=True)
        packed = sequence_scores(model, batch, padding_free=True, want_entropy=True)
    for name in ("chosen_entropy", "rejected_entropy"):
        assert torch.isfinite(getattr(packed, name)).all(), name
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), atol=1e-5, rtol=1e-5, msg=name)
