"""EXO-rw / DPO-rw on K-sample groups: the group step against an independent forward, the loop's group
data, and one small Ray Train run against the in-process oracle."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pandas as pd
import pytest
import torch

from rayalign.config import ConfigError
from rayalign.config_loader import load_config
from rayalign.core.losses import dpo_rw_loss, exo_rw_loss
from rayalign.data_kind import GROUPS
from rayalign.encode import collate_with_reference
from rayalign.oracle import encode_pairs, reference_columns, train_pairs
from rayalign.step import micro_batch_loss
from rayalign.tasks.sentiment import gold_pairs, gold_reward, make_prompts, make_response

BASE = ["optim.lr=5e-4", "optim.warmup_ratio=0", "optim.scheduler=constant", "data.max_completion_length=40"]


def gold_groups(n: int, k: int, *, seed: int) -> list[dict]:
    """`n` k_sample rows of the sentiment task: K reviews of mixed sentiment scored by the gold reward."""
    rng = random.Random(seed)
    rows = []
    for prompt in make_prompts(n, seed=seed + 1):
        texts = [make_response(rng, positive_share=rng.random()) for _ in range(k)]
        rows.append({"prompt": prompt, "completions": texts, "rewards": [gold_reward(t) for t in texts]})
    return rows


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from rayalign.models import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def _perturbed(model, seed=0):
    policy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move the policy away from the reference so the loss is not at its start value
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return policy


def _plain_logps(model, tokenizer, prompt: str, completion: str, *, temperature: float, max_len: int):
    """log pi(completion + EOS | prompt) from one unpadded forward of that single sequence."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = (tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_len]
    ids = torch.tensor([prompt_ids + completion_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1] / temperature, dim=-1)
    targets = ids[0, len(prompt_ids):]
    return logp[len(prompt_ids) - 1:].gather(-1, targets[:, None]).sum()


@pytest.mark.parametrize("loss, function", [("exo_rw", exo_rw_loss), ("dpo_rw", dpo_rw_loss)])
def test_group_step_equals_the_loss_on_an_independent_forward(tiny, loss, function):
    """The step's (B,) losses equal core.losses on log-probs from one plain forward per sequence, with
    beta_pi, beta_r and the logit temperature taken from the config; cached == in-step reference;
    the metrics' chosen/rejected are the best/worst-reward samples; gradients flow to the policy."""
    model, tokenizer = tiny
    rows = gold_groups(3, 4, seed=7)
    config = load_config(None, [*BASE, f"loss.type={loss}", "loss.beta=0.2", "loss.beta_r=2.0",
                                "loss.logit_temperature=0.8"])
    encoded = encode_pairs(rows, tokenizer, config).items
    columns = reference_columns(model, encoded, pad_token_id=tokenizer.pad_token_id, config=config)
    batch = collate_with_reference(encoded, columns, torch.arange(3), kind=GROUPS, pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 12 and columns["ref_logps"].shape == (3, 4)
    policy = _perturbed(model)
    out = micro_batch_loss(policy, batch, config)
    out.losses.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())

    with torch.no_grad():
        plain = {name: torch.stack([torch.stack([_plain_logps(m, tokenizer, r["prompt"], c, temperature=0.8,
                                                              max_len=40) for c in r["completions"]])
                                    for r in rows]) for name, m in (("policy", policy), ("ref", model))}
    rewards = torch.tensor([r["rewards"] for r in rows])
    expected = function(plain["policy"], plain["ref"], rewards, beta_pi=0.2, beta_r=2.0).losses
    torch.testing.assert_close(out.losses.detach(), expected, atol=1e-5, rtol=1e-4)
    best, worst = rewards.argmax(-1), rewards.argmin(-1)
    torch.testing.assert_close(out.policy_chosen_logps, plain["policy"][torch.arange(3), best], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.ref_rejected_logps, plain["ref"][torch.arange(3), worst], atol=1e-4, rtol=1e-5)

    bare = {k: v for k, v in batch.items() if k != "ref_logps"}
    torch.testing.assert_close(micro_batch_loss(policy, bare, config, reference=model).losses, out.losses)
    packed = load_config(None, [*BASE, f"loss.type={loss}", "loss.beta=0.2", "loss.beta_r=2.0",
                                "loss.logit_temperature=0.8", "train.padding_free=true"])
    torch.testing.assert_close(micro_batch_loss(policy, batch, packed).losses, out.losses, atol=1e-5, rtol=1e-5)


def test_group_and_pair_data_do_not_mix(tiny):
    model, tokenizer = tiny
    config = load_config(None, [*BASE, "loss.type=exo_rw", "train.global_batch_size=2", "train.max_steps=1"])
    with pytest.raises(ConfigError, match="exo_rw trains on K-sample groups"):
        train_pairs(copy.deepcopy(model), model, tokenizer, gold_pairs(2, seed=0), config)
    dpo = load_config(None, [*BASE, "train.global_batch_size=2", "train.max_steps=1"])
    with pytest.raises(ConfigError, match="holds k_sample rows; training needs pairs"):
        train_pairs(copy.deepcopy(model), model, tokenizer, gold_groups(2, 3, seed=0), dpo)
    mixed = gold_groups(2, 3, seed=0) + gold_groups(1, 4, seed=1)
    from rayalign.group_batching import check_group_rows

    with pytest.raises(ConfigError, match="same K in every row .* K = 3, 4"):
        check_group_rows(mixed, "mixed.jsonl")


def _loop_artifacts(tmp_path: Path) -> Path:
    """iter-1/samples.parquet and judged.parquet as the loop writes them, for 4 prompts of K=3 samples."""
    texts = {0: [" great fun.", " dull and bad.", " quiet."],  # kept
             1: [" great.", "  ", " bad."],  # an empty sample
             2: [" the same.", " the same.", " the same."],  # all identical
             3: [" long.", " quiet.", " old."]}  # gold ties (all 0); the judge still ranks them
    samples = pd.DataFrame([{"prompt_id": p, "sample_index": i, "prompt": f"prompt {p}", "text": t}
                            for p, group in texts.items() for i, t in enumerate(group)])
    judged = pd.DataFrame([{"prompt_id": p, "prompt": f"prompt {p}", "chosen": texts[p][0], "rejected": texts[p][1],
                            "judge_rewards": [0.3, -0.2, 0.1]} for p in (0, 3)])
    it_dir = tmp_path / "iter-1"
    it_dir.mkdir()
    samples.to_parquet(it_dir / "samples.parquet")
    judged.to_parquet(it_dir / "judged.parquet")
    return it_dir / "judged.parquet"


def test_loop_training_data_per_loss_and_reward_source(tmp_path):
    from rayalign.data import load_rows
    from rayalign.judge import training_data

    judged = str(_loop_artifacts(tmp_path))
    config = load_config(None, ["loss.type=exo_rw"])
    assert training_data(config, "seed.jsonl", 0) == ("dpo", "seed.jsonl")  # K-sample loss: DPO on gold seeds
    assert config.loss.type == "exo_rw"  # the user's config is left as written
    assert training_data(load_config(None, []), judged, 1) == (None, judged)

    _, path = training_data(config, judged, 1)
    assert Path(path).name == "groups.parquet"
    data = load_rows(path)
    assert data.format == "k_sample"
    assert [(r["id"], r["rewards"]) for r in data.rows] == [(0, [0.3, -0.2, 0.1]), (3, [0.3, -0.2, 0.1])]

    gold = load_config(None, ["loss.type=dpo_rw", "loop.rewards=gold"])
    rows = load_rows(training_data(gold, judged, 1)[1]).rows
    assert [(r["id"], r["completions"][0], r["rewards"]) for r in rows] == [(0, " great fun.", [1.0, -2.0, 0.0])]

    pairs = load_rows(training_data(load_config(None, ["loop.rewards=gold"]), judged, 1)[1])
    assert pairs.format == "explicit"
    assert [(r["chosen"], r["rejected"]) for r in pairs.rows] == [(" great fun.", " dull and bad.")]


@pytest.mark.slow
def test_ray_train_on_groups_matches_the_oracle(tiny_model_dir, tmp_path):
    """`rayalign train` with loss.type=exo_rw on 2 workers (cached reference as a list column through Ray
    Data and Parquet) computes what the in-process oracle computes, metrics included; eval runs too."""
    from rayalign.models import load_model, load_tokenizer
    from rayalign.run_dir import prepare_run_dir
    from rayalign.train import run_train, split_eval

    data = tmp_path / "groups.jsonl"
    rows = gold_groups(8, 3, seed=3)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [*BASE, f"model.policy={tiny_model_dir}", f"data.train_file={data}", "loss.type=exo_rw",
                 "loss.beta_r=1.0", "data.eval_fraction=0.25", "train.num_workers=2",
                 "train.global_batch_size=4", "train.max_steps=2",
                 f"run.dir={tmp_path / 'run'}"]
    try:
        assert run_train(prepare_run_dir(load_config(None, overrides))) == 0
    finally:
        import ray

        ray.shutdown()
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]  # 6 training groups, 4 per step
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["eval/loss"] > 0 and 0 <= final["eval/rewards/accuracies"] <= 1

    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    config = load_config(None, overrides)
    history = train_pairs(model, copy.deepcopy(model).requires_grad_(False), tokenizer,
                          split_eval(rows, config, tokenizer)[0], config)
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        # rel: a summed log-prob of -250 has float32 steps of 1.5e-5 (measured one step apart, packed rows)
        assert [h[key] for h in history] == pytest.approx([s[key] for s in steps], abs=1e-5, rel=1e-6), key
    from safetensors.torch import load_file

    oracle = model.state_dict()
    for name, value in load_file(tmp_path / "run" / "final" / "model.safetensors").items():
        torch.testing.assert_close(value, oracle[name], atol=2e-5, rtol=0, msg=name)


def test_stage_inputs_loss_replaces_only_the_loss_type():
    from rayalign.stage_inputs import StageInputs

    config = load_config(None, ["loss.type=exo_rw", "loss.beta=0.3"])
    stage = StageInputs(loss_type="dpo").stage_config(config)
    assert (stage.loss.type, stage.loss.beta, config.loss.type) == ("dpo", 0.3, "exo_rw")
    assert StageInputs().stage_config(config) is config
    assert StageInputs.from_config(config).loss_type is None
