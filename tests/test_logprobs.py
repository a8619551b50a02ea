"""Token/sequence log-probs, entropies and the concatenated chosen+rejected forward.

Fast vectorised code is checked against slow, obvious Python loops (the oracle), and
`concatenated_forward` against separate, unpadded forwards of a tiny random Llama.
"""

import math
import os

import pytest
import torch

from rayalign.core.logprobs import (
    concatenated_forward,
    sequence_logps,
    sequence_mean_entropy,
    shift_for_causal_lm,
    token_logps,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
F64 = torch.float64


def _random_batch(batch=3, length=7, vocab=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    mask[0, 2:] = 1
    mask[1, 4:6] = 1
    mask[2, :] = 1
    return logits, labels, mask


def _slow_token_logp(row_logits, label):
    """log softmax(row)[label] with plain Python floats."""
    values = [float(v) for v in row_logits]
    top = max(values)
    log_norm = top + math.log(sum(math.exp(v - top) for v in values))
    return values[int(label)] - log_norm


def _slow_sequence_logps(logits, labels, mask, average=False):
    out = []
    for b in range(logits.shape[0]):
        terms = [_slow_token_logp(logits[b, t], labels[b, t]) for t in range(logits.shape[1]) if mask[b, t]]
        total = sum(terms)
        out.append(total / max(len(terms), 1) if average else total)
    return torch.tensor(out, dtype=F64)


def test_sequence_logps_matches_python_loop():
    logits, labels, mask = _random_batch()
    torch.testing.assert_close(
        sequence_logps(logits, labels, mask).double(), _slow_sequence_logps(logits, labels, mask)
    )
    torch.testing.assert_close(
        sequence_logps(logits, labels, mask, average=True).double(),
        _slow_sequence_logps(logits, labels, mask, average=True),
    )


def test_per_token_mean_is_sum_over_count():
    """average=True divides the sum by the number of completion tokens (5, 2 and 7 here)."""
    logits, labels, mask = _random_batch()
    total = sequence_logps(logits, labels, mask)
    mean = sequence_logps(logits, labels, mask, average=True)
    torch.testing.assert_close(mean, total / torch.tensor([5.0, 2.0, 7.0]))


def test_token_logps_zero_outside_mask_and_ignores_masked_labels():
    """Masked positions give exactly 0, whatever their label (−100, out-of-vocabulary pad ids)."""
    logits, labels, mask = _random_batch()
    dirty = labels.masked_fill(mask == 0, -100)
    per_token = token_logps(logits, dirty, mask)
    assert (per_token[mask == 0] == 0).all()
    torch.testing.assert_close(per_token, token_logps(logits, labels, mask))
    dirty = labels.masked_fill(mask == 0, 10_000)
    torch.testing.assert_close(per_token, token_logps(logits, dirty, mask))


def test_token_logps_masked_minus_inf_is_not_nan():
    """A −inf logit for the label at a masked position must not leak 0·(−inf) = NaN."""
    logits, labels, mask = _random_batch()
    logits = logits.clone()
    logits[0, 0, labels[0, 0]] = -math.inf
    logits.requires_grad_(True)
    out = sequence_logps(logits, labels, mask)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


def test_empty_completion_gives_zero():
    logits, labels, _ = _random_batch()
    mask = torch.zeros_like(labels)
    assert (sequence_logps(logits, labels, mask) == 0).all()
    assert (sequence_logps(logits, labels, mask, average=True) == 0).all()
    assert (sequence_mean_entropy(logits, mask) == 0).all()


def test_dtypes_upcast_bf16_keep_float64():
    """bf16 logits are upcast to float32 before log-softmax; float64 stays float64."""
    logits, labels, mask = _random_batch(dtype=torch.bfloat16)
    out = sequence_logps(logits, labels, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sequence_logps(logits.float(), labels, mask))
    assert sequence_logps(logits.double(), labels, mask).dtype == F64


def test_sequence_logps_gradcheck():
    logits, labels, mask = _random_batch(length=6, vocab=5, dtype=F64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sequence_logps(z, labels, mask, average=True), (logits,))


def test_shift_for_causal_lm():
    """Position t's logits score token t+1; the completion mask moves with the targets."""
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    ids = torch.arange(10).reshape(2, 5)
    completion = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    shifted_logits, targets, mask = shift_for_causal_lm(logits, ids, completion)
    torch.testing.assert_close(shifted_logits, logits[:, :4])
    torch.testing.assert_close(targets, ids[:, 1:])
    torch.testing.assert_close(mask, completion[:, 1:])


# ---------------------------------------------------------------- entropy


def _slow_mean_entropy(logits, mask):
    out = []
    for b in range(logits.shape[0]):
        entropies = []
        for t in range(logits.shape[1]):
            if not mask[b, t]:
                continue
            values = [float(v) for v in logits[b, t]]
            top = max(values)
            norm = sum(math.exp(v - top) for v in values)
            probs = [math.exp(v - top) / norm for v in values]
            entropies.append(-sum(p * math.log(p) for p in probs if p > 0))
        out.append(sum(entropies) / max(len(entropies), 1))
    return torch.tensor(out, dtype=F64)


def test_sequence_mean_entropy_matches_manual():
    logits, _, mask = _random_batch()
    got = sequence_mean_entropy(logits, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _slow_mean_entropy(logits, mask), atol=1e-5, rtol=1e-5)


def test_sequence_mean_entropy_bounds_and_uniform():
    """Uniform logits give ln V exactly; a one-hot-like distribution gives ≈ 0; always in [0, ln V]."""
    vocab = 50
    mask = torch.ones(2, 3)
    uniform = torch.zeros(2, 3, vocab)
    torch.testing.assert_close(sequence_mean_entropy(uniform, mask), torch.full((2,), math.log(vocab)))
    peaked = torch.full((2, 3, vocab), -1e4)
    peaked[..., 0] = 0.0
    assert sequence_mean_entropy(peaked, mask).abs().max() < 1e-6


def test_sequence_mean_entropy_bf16_upcast():
    """bf16 logits: computed in float32 (same as upcasting first), positive for a sharp distribution."""
    logits, _, mask = _random_batch(dtype=torch.bfloat16, vocab=64)
    sharp = logits * 4
    got = sequence_mean_entropy(sharp, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sequence_mean_entropy(sharp.float(), mask))
    assert (got > 0).all()


def test_sequence_mean_entropy_with_minus_inf_vocabulary_entries():
    """Masked-out vocabulary entries (logit −inf, p = 0) contribute 0, not NaN."""
    logits, _, mask = _random_batch(dtype=F64)
    logits[..., 3] = -math.inf
    got = sequence_mean_entropy(logits, mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _slow_mean_entropy(logits[..., [i for i in range(11) if i != 3]], mask))


# ---------------------------------------------------------------- concatenated forward on a tiny Llama


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _pair_batch():
    """Two pairs; chosen rows are 7 tokens (one right-padded to 5 real), rejected rows 9 tokens."""
    g = torch.Generator().manual_seed(1)
    chosen = torch.randint(1, 64, (2, 7), generator=g)
    chosen_attn = torch.ones(2, 7, dtype=torch.long)
    chosen_attn[1, 5:] = 0
    chosen[1, 5:] = 0
    chosen_completion = torch.zeros(2, 7, dtype=torch.long)
    chosen_completion[0, 3:] = 1
    chosen_completion[1, 2:5] = 1
    rejected = torch.randint(1, 64, (2, 9), generator=g)
    rejected_attn = torch.ones(2, 9, dtype=torch.long)
    rejected_completion = torch.zeros(2, 9, dtype=torch.long)
    rejected_completion[0, 3:] = 1
    rejected_completion[1, 2:] = 1
    return chosen, chosen_attn, chosen_completion, rejected, rejected_attn, rejected_completion


def _separate_logps(model, ids, attn, completion, *, average=False, temperature=1.0):
    """One unpadded forward per row: the oracle for the padded, concatenated forward."""
    out = []
    for row in range(ids.shape[0]):
        length = int(attn[row].sum())
        logits = model(input_ids=ids[row : row + 1, :length]).logits / temperature
        out.append(
            sequence_logps(
                *shift_for_causal_lm(logits, ids[row : row + 1, :length], completion[row : row + 1, :length]),
                average=average,
            )
        )
    return torch.cat(out)


@pytest.mark.parametrize("average,temperature", [(False, 1.0), (True, 1.0), (False, 0.8)])
def test_concatenated_forward_matches_separate_forwards(tiny_llama, average, temperature):
    batch = _pair_batch()
    with torch.no_grad():
        out = concatenated_forward(tiny_llama, *batch, average=average, logit_temperature=temperature)
        chosen = _separate_logps(tiny_llama, *batch[:3], average=average, temperature=temperature)
        rejected = _separate_logps(tiny_llama, *batch[3:], average=average, temperature=temperature)
    torch.testing.assert_close(out.chosen_logps, chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.rejected_logps, rejected, atol=1e-5, rtol=1e-5)
    assert out.logits is None and out.hidden_states is None


def test_concatenated_forward_runs_one_forward_and_returns_aligned_tensors(tiny_llama):
    calls = []

    def counting_model(**kwargs):
        calls.append(kwargs["input_ids"].shape)
        return tiny_llama(**kwargs)

    batch = _pair_batch()
    out = concatenated_forward(counting_model, *batch, return_logits=True, output_hidden_states=True)
    assert calls == [torch.Size([4, 9])]
    assert out.logits.shape == (4, 8, 64) and out.labels.shape == (4, 8) and out.mask.shape == (4, 8)
    assert out.attention_mask.shape == (4, 9) and out.attention_mask[0, 7:].sum() == 0
    assert len(out.hidden_states) == 3  # embeddings + 2 layers
    # The aligned outputs reproduce the log-probs, and gradients reach the model's parameters.
    torch.testing.assert_close(
        torch.cat([out.chosen_logps, out.rejected_logps]), sequence_logps(out.logits, out.labels, out.mask)
    )
    out.chosen_logps.sum().backward()
    assert tiny_llama.model.embed_tokens.weight.grad is not None
    tiny_llama.zero_grad(set_to_none=True)


def test_concatenated_forward_validates_inputs(tiny_llama):
    batch = _pair_batch()
    with pytest.raises(ValueError):
        concatenated_forward(tiny_llama, *batch, logit_temperature=0.0)
    with pytest.raises(ValueError):
        concatenated_forward(tiny_llama, *batch[:3], batch[3][:1], batch[4][:1], batch[5][:1])
