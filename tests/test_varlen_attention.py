"""Per-sequence attention for packed rows (`rayalign.varlen_attention`) against independent forwards.

A packed row of four sequences through `rayalign.lm_head.packed_token_logps` (which switches the model to
`varlen_attention`) gives the log-probs and parameter gradients of four separate forwards of an unswitched
copy (1e-5), with gradient checkpointing too (its recompute in backward runs outside the call that switched);
with grouped-query attention; and a switched model still computes padded batches and KV-cache generation
exactly as transformers' `sdpa` does. Models on `eager` are left alone. On CPU the per-sequence attention
runs SDPA's fused kernel (profiled).
"""

from __future__ import annotations

import copy

import torch

from rayalign.lm_head import packed_token_logps
from rayalign.varlen_attention import NAME, segment_bounds, use_varlen_attention

LENGTHS = (7, 12, 5, 20)


def _model(tiny_model_dir, **config_overrides):
    from rayalign.models import load_model

    model = load_model(str(tiny_model_dir))
    if config_overrides:  # a fresh random model of another shape (GQA): same family, new config
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(model.config)
        for key, value in config_overrides.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.float()


def _packed_row(vocab: int):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (sum(LENGTHS),), generator=g)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    segment = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])
    return ids, positions, segment


def _separate_logps(model, ids: torch.Tensor) -> torch.Tensor:
    """Each sequence in its own forward: its next-token log-probs, concatenated."""
    out, start = [], 0
    for n in LENGTHS:
        seq = ids[start:start + n]
        logps = model(input_ids=seq[None]).logits[0, :-1].float().log_softmax(-1)
        out.append(logps.gather(-1, seq[1:, None])[:, 0])
        start += n
    return torch.cat(out)


def _assert_packed_equals_separate(model):
    reference = copy.deepcopy(model)
    ids, positions, segment = _packed_row(model.config.vocab_size)
    per_token, mask, _ = packed_token_logps(model, ids, positions, torch.ones_like(ids), segment, chunk_rows=16)
    assert model.config._attn_implementation == NAME
    separate = _separate_logps(reference, ids)
    packed = per_token[mask.bool()]
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=0)
    packed.sum().backward()
    separate.sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=0, msg=name)


def test_segment_bounds_follow_position_restarts():
    assert segment_bounds(torch.tensor([0, 1, 2, 0, 1, 0, 0, 1])) == [0, 3, 5, 6, 8]
    assert segment_bounds(torch.arange(5)) == [0, 5]
    assert segment_bounds(torch.tensor([4, 5, 6, 2, 3])) == [0, 3, 5]  # any non-+1 step starts a sequence


def test_packed_row_equals_separate_forwards(tiny_model_dir):
    _assert_packed_equals_separate(_model(tiny_model_dir))


def test_packed_row_with_gradient_checkpointing(tiny_model_dir):
    model = _model(tiny_model_dir)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing is active in training mode only; the tiny model has no dropout
    _assert_packed_equals_separate(model)


def test_packed_row_with_grouped_query_attention(tiny_model_dir):
    model = _model(tiny_model_dir, num_attention_heads=4, num_key_value_heads=2)
    _assert_packed_equals_separate(model)


def test_switched_model_keeps_padded_batches_and_generation(tiny_model_dir):
    model = _model(tiny_model_dir)
    plain = copy.deepcopy(model)
    assert use_varlen_attention(model) and model.config._attn_implementation == NAME
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    with torch.no_grad():
        for kwargs in ({"input_ids": ids, "attention_mask": mask}, {"input_ids": ids}):
            torch.testing.assert_close(model(**kwargs).logits, plain(**kwargs).logits, atol=1e-5, rtol=0)
        generated = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
        assert torch.equal(generated, plain.generate(ids[:1], max_new_tokens=6, do_sample=False))


def test_eager_models_are_left_alone(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="eager")
    assert not use_varlen_attention(model) and model.config._attn_implementation == "eager"


def test_cpu_attention_runs_the_fused_kernel_once_per_sequence():
    """On CPU each sequence goes through SDPA's fused flash kernel, forward and backward, and never its unfused
    math fallback (bmm + softmax), which 3-D inputs used to select; the gradients of q, k and v come back through
    one `cat` rather than a zero-filled full-size tensor per sequence."""
    from torch.profiler import ProfilerActivity, profile

    from rayalign.varlen_attention import varlen_attention

    class Module:
        is_causal = True

    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 4, sum(LENGTHS), 8, generator=g, requires_grad=True) for _ in range(3))
    _, positions, _ = _packed_row(32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out, _ = varlen_attention(Module(), query, key, value, None, position_ids=positions[None])
        out.sum().backward()
    calls = {event.key: event.count for event in prof.key_averages()}
    fused = [name for name in calls if "flash_attention" in name and "backward" not in name]
    assert fused and sum(calls[name] for name in fused) == len(LENGTHS), calls
    assert any("flash_attention" in name and "backward" in name for name in calls), calls
    assert "aten::bmm" not in calls and "aten::_softmax" not in calls, calls
    assert calls.get("aten::fill_", 0) < len(LENGTHS), calls
