"""GDPO in the training step: belief-prefix encoding, its checks, and the loss against a direct computation."""

from __future__ import annotations

import copy

import pytest
import torch

from rayalign.batching import encode_gdpo, gdpo_rows_as_pairs
from rayalign.config_loader import load_config
from rayalign.core.losses import dpo_loss
from rayalign.data_kind import BELIEFS
from rayalign.encode import collate, collate_with_reference
from rayalign.oracle import encode_pairs, reference_columns, train_pairs
from rayalign.step import micro_batch_loss

ROW = {"prompt": "\n\nHuman: Which season do you like?\n\nAssistant:", "target": [0.2, 0.5, 0.3],
       "belief": 1, "belief_text": "summer", "chosen": " Summer, for the long days.",
       "rejected": " Winter, for the snow.", "rejected_belief": 2, "rejected_belief_text": "winter"}


def gdpo_rows(n: int) -> list[dict]:
    seasons = ["spring", "summer", "winter"]
    rows = []
    for i in range(n):
        belief, other = i % 3, (i + 1) % 3
        rows.append({**ROW, "belief": belief, "belief_text": seasons[belief],
                     "chosen": f" I like {seasons[belief]} best.", "rejected": f" I like {seasons[other]} best.",
                     "rejected_belief": other, "rejected_belief_text": seasons[other]})
    return rows


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from rayalign.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def test_encoding_splits_prefix_and_answer(tiny):
    _, tok = tiny
    e = encode_gdpo(tok, ROW, max_prompt_length=64, max_completion_length=64)
    prefix = tok("1<summer", add_special_tokens=False)["input_ids"]
    assert e["chosen_ids"][:len(prefix)] == prefix == e["rejected_ids"][:len(prefix)]
    assert e["chosen_ids"][len(prefix)] == tok(">", add_special_tokens=False)["input_ids"][0]
    assert e["belief_len"] == len(prefix) and e["level_ids"] == [tok(str(d))["input_ids"][0] for d in range(3)]
    batch = collate([e], BELIEFS, pad_token_id=tok.pad_token_id)
    p = len(e["prompt_ids"])
    assert batch["chosen_belief_mask"][0, p:p + len(prefix)].tolist() == [1] * len(prefix)
    assert batch["chosen_completion_mask"][0, :p + len(prefix)].sum() == 0  # DPO term: '>' + answer + EOS only
    assert int(batch["chosen_completion_mask"][0].sum()) == len(e["chosen_ids"]) - len(prefix)


def test_tokenizer_checks_fail_clearly(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="one token of its own"):
        encode_gdpo(tok, {**ROW, "target": [0.1] * 10 + [0.0]}, max_prompt_length=64, max_completion_length=64)


def test_dpo_baseline_rows_state_the_other_belief():
    (pair,) = gdpo_rows_as_pairs([ROW])
    assert pair["chosen"] == "1<summer> Summer, for the long days." and pair["rejected"].startswith("2<winter>")


def answer_logp(model, e: dict, side: str) -> torch.Tensor:
    """Summed log-prob of '>' + answer + EOS given prompt + belief prefix, from a plain forward."""
    ids = e["prompt_ids"] + e[f"{side}_ids"]
    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    start = len(e["prompt_ids"]) + e["belief_len"]
    return sum(lp[t - 1, ids[t]] for t in range(start, len(ids)))


def test_gdpo_loss_equals_direct_computation(tiny):
    """loss = KL(p*||q) - mean logp(belief prefix) + DPO(answers), each term from its own forward pass."""
    model, tok = tiny
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    config = load_config(None, ["loss.type=gdpo"])
    encoded = encode_pairs(gdpo_rows(3), tok, config).items
    columns = reference_columns(model, encoded, pad_token_id=tok.pad_token_id, config=config)
    batch = collate_with_reference(encoded, columns, torch.arange(3), kind=BELIEFS, pad_token_id=tok.pad_token_id)
    losses = micro_batch_loss(policy, batch, config).losses
    for i, e in enumerate(encoded):
        prompt, prefix = e["prompt_ids"], e["chosen_ids"][:e["belief_len"]]
        with torch.no_grad():
            logp = torch.log_softmax(policy(torch.tensor([prompt + prefix])).logits[0], -1)
        q = logp[len(prompt) - 1, e["level_ids"]]
        target = torch.tensor(e["target"])
        kl = (target * (target.log() - q)).sum()
        belief = torch.stack([logp[len(prompt) - 1 + j, t] for j, t in enumerate(prefix)]).mean()

        with torch.no_grad():
            logps = [torch.stack([answer_logp(m, e, side)]) for m in (policy, model) for side in ("chosen", "rejected")]
            dpo = dpo_loss(*logps, beta=0.1).losses[0]
        torch.testing.assert_close(losses[i], kl - belief + dpo, atol=1e-4, rtol=1e-4)


def test_gdpo_training_lowers_the_loss(tiny):
    model, tok = tiny
    policy, reference = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
    config = load_config(None, ["loss.type=gdpo", "optim.lr=3e-3", "optim.warmup_ratio=0",
                                "train.global_batch_size=6", "train.epochs=8"])
    rows = gdpo_rows(6)
    history = train_pairs(policy, reference, tok, rows, config)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["rewards/accuracies"] >= history[0]["rewards/accuracies"]
