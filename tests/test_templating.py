"""Chat templates, one tokenization everywhere (`rayalign.templating`), on the ChatML tiny model.

A conversational prompt + completion must have the same token ids in every stage that tokenizes: HF
generation (the prompt ids it conditions on, the sampled ids), the judge (`Judge.encode`, which the
evaluation pass runs too), the judged pairs read back as training data (`load_rows` + `encode_row`, what
the oracle and the Ray Train workers collate), `PairEncoder` (reference scoring's input), SFT, and a
conversational data file. Numbers are checked too: the judge's log-probs and the reference scorer's equal
the generator's own log-probs of the same tokens. TRL 1.16 is the independent reference for the
templated ids. vLLM's prompt path is in test_vllm_backend.py. No Ray except in the one `slow` test.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from rayalign.config import ConfigError
from rayalign.config_loader import load_config
from rayalign.templating import (
    check_data_template,
    check_prompts_template,
    encode_prompt_completion,
    end_at_eos,
    prompt_columns,
    prompt_ids,
    prompt_value,
    prompt_values,
    render_completion,
    render_prompt,
)

MESSAGES = [{"role": "system", "content": "You review things."}, {"role": "user", "content": "How was the movie?"}]
RENDERED = ("<|im_start|>system\nYou review things.<|im_end|>\n<|im_start|>user\nHow was the movie?<|im_end|>\n"
            "<|im_start|>assistant\n")
IM_START, IM_END, ENDOFTEXT = 1, 2, 0  # ids of the ChatML tiny model's special tokens


@pytest.fixture(scope="module")
def tok(chat_model_dir):
    from rayalign.models import load_tokenizer

    return load_tokenizer(chat_model_dir)


def test_chatml_tiny_model(chat_model_dir, tok, tmp_path):
    from transformers import AutoConfig, GenerationConfig

    from rayalign.tiny import add_make_tiny_model_arguments, run_make_tiny_model

    assert (tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"]) == [IM_START, IM_END, ENDOFTEXT])
    assert (tok.eos_token_id, tok.pad_token_id) == (IM_END, ENDOFTEXT)
    assert AutoConfig.from_pretrained(chat_model_dir).eos_token_id == IM_END
    assert GenerationConfig.from_pretrained(chat_model_dir).eos_token_id == IM_END  # generation stops there
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == RENDERED
    # the special tokens are single tokens in any text, and skipped when decoding a sample
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == IM_START and ids[-1] == IM_END and tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    # the command line writes the same files
    import argparse

    args = add_make_tiny_model_arguments(argparse.ArgumentParser()).parse_args(
        [str(tmp_path / "m"), "--chat-template", "chatml"])
    assert run_make_tiny_model(args) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        assert (tmp_path / "m" / name).read_bytes() == (chat_model_dir / name).read_bytes()


def test_templated_ids_are_trls_and_end_at_the_end_of_turn(tok):
    """TRL 1.16 tokenizes a conversational pair as apply_chat_template(prompt, add_generation_prompt=True)
    and apply_chat_template(prompt + completion); the completion is the rest. Ours is the same ids without
    the separator after "<|im_end|>", where generation stops."""
    from trl.data_utils import _tokenize  # trl==1.16.0 is a dev dependency (pinned: a private helper)

    answer = [{"role": "assistant", "content": "It was great."}]
    trl_prompt = _tokenize(tok, MESSAGES, add_generation_prompt=True)["input_ids"]
    trl_full = _tokenize(tok, MESSAGES + answer)["input_ids"]
    for completion in ("It was great.", answer):  # an assistant's content, or its message list
        ours = encode_prompt_completion(tok, MESSAGES, completion)
        assert ours["prompt_ids"] == trl_prompt == trl_full[:len(trl_prompt)]
        assert trl_full[len(trl_prompt):] == ours["completion_ids"] + tok("\n", add_special_tokens=False)["input_ids"]
        assert ours["completion_ids"][-1] == IM_END and IM_END not in ours["completion_ids"][:-1]
        assert tok.decode(ours["completion_ids"]) == "It was great.<|im_end|>"
    assert render_prompt(tok, MESSAGES) == RENDERED
    assert render_completion(tok, MESSAGES, "It was great.") == "It was great.<|im_end|>\n"
    # the rendered strings tokenize to the same ids (what the data loader and the judge's pairs hold)
    assert encode_prompt_completion(tok, RENDERED, "It was great.<|im_end|>\n") == encode_prompt_completion(
        tok, MESSAGES, "It was great.")


def test_string_data_stays_raw_text(tok):
    out = encode_prompt_completion(tok, "How was it?", " Fine", max_prompt_length=2, max_completion_length=2)
    raw_prompt, raw_completion = (tok(t, add_special_tokens=False)["input_ids"] for t in ("How was it?", " Fine"))
    assert out["prompt_ids"] == raw_prompt[-2:] and out["prompt_truncated"] == (len(raw_prompt) > 2)
    assert out["completion_ids"] == (raw_completion + [IM_END])[:2]
    # eos is appended unless the text already ends with it (whitespace after it aside); eos inside is content
    word = tok("fine", add_special_tokens=False)["input_ids"]
    assert end_at_eos(tok, word) == word + [IM_END]
    assert end_at_eos(tok, word + [IM_END]) == word + [IM_END]
    assert end_at_eos(tok, word + [IM_END] + tok("\n ", add_special_tokens=False)["input_ids"]) == word + [IM_END]
    assert end_at_eos(tok, [IM_END] + word) == [IM_END] + word + [IM_END]


def test_prompt_columns_carry_strings_and_messages(tmp_path):
    frame = pd.DataFrame({"prompt_id": [0, 1], **prompt_columns(["plain text", MESSAGES])})
    assert list(frame["prompt_messages"]) == [False, True] and json.loads(frame["prompt"][1]) == MESSAGES
    frame.to_parquet(tmp_path / "p.parquet")
    back = pd.read_parquet(tmp_path / "p.parquet")
    assert prompt_values(back) == ["plain text", MESSAGES]
    # a row of a frame concatenated with one that lacks the column (NaN) holds a string prompt
    mixed = pd.concat([back, pd.DataFrame({"prompt_id": [2], "prompt": ["[1]"]})], ignore_index=True)
    assert prompt_value(mixed.iloc[2]) == "[1]" and prompt_values(mixed)[1] == MESSAGES
    assert prompt_values(pd.DataFrame({"prompt": ["a"]})) == ["a"]  # no column: strings only


def test_no_chat_template_is_a_clear_error(tok, tmp_path):
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(ValueError, match="a prompt is a list of messages, but the tokenizer .* has no chat template"):
        prompt_ids(plain, MESSAGES)
    assert prompt_ids(plain, "text")[0] == tok("text", add_special_tokens=False)["input_ids"]  # strings need none
    with pytest.raises(ConfigError) as e:
        check_data_template(plain, "conversational", key="data.train_file", source="c.jsonl", name="my-model")
    assert str(e.value) == ("data.train_file: c.jsonl holds message lists, but the tokenizer my-model has no chat "
                            "template to render them; use a model (or model.tokenizer) whose tokenizer has one, or "
                            "string prompts and completions")
    check_data_template(plain, "explicit", key="data.train_file", source="p.jsonl", name="my-model")
    check_data_template(None, "conversational", key="data.train_file", source="c.jsonl", name="")  # tiny from data
    plain.save_pretrained(tmp_path / "plain")
    check_prompts_template(["a", "b"], str(tmp_path / "plain"))  # string prompts: not even loaded
    with pytest.raises(ConfigError, match=r"^data.prompts_file: prompts.jsonl holds message lists, but the tok"):
        check_prompts_template(["a", MESSAGES], str(tmp_path / "plain"), source="prompts.jsonl")


def test_train_refuses_conversational_data_on_a_tokenizer_without_template(tok, tmp_path):
    """`rayalign train`: a config error before Ray starts or anything is written but config.yaml."""
    import copy

    from rayalign.train import run_train

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "plain")
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"prompt": MESSAGES, "chosen": [{"role": "assistant", "content": "Good."}],
                                "rejected": [{"role": "assistant", "content": "Bad."}]}) + "\n")
    config = load_config(None, [f"data.train_file={data}", f"model.policy={tmp_path / 'plain'}",
                                f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=f"^data.train_file: {data} holds message lists, but the tokenizer "):
        run_train(config)
    assert not (tmp_path / "run" / "prepared").exists()


def test_k_sample_groups_of_message_prompts_are_rendered(tok):
    """exo_rw / dpo_rw in the loop: the groups file holds rendered text, which encodes like the judge's ids."""
    from rayalign.data_kind import GROUPS
    from rayalign.encode import encode_row
    from rayalign.judge import sample_groups

    samples = pd.DataFrame({"prompt_id": [5, 5], "sample_index": [0, 1], **prompt_columns([MESSAGES, MESSAGES]),
                            "text": ["Good.", "Bad."]})
    judged = pd.DataFrame({"prompt_id": [5], "judge_rewards": [[0.5, -0.5]]})
    (row,), counts = sample_groups(samples, judged, rewards="judge", tokenizer=tok)
    assert counts["groups"] == 1 and row["prompt"] == RENDERED
    assert row["completions"] == ["Good.<|im_end|>\n", "Bad.<|im_end|>\n"] and row["rewards"] == [0.5, -0.5]
    encoded = encode_row(tok, row, GROUPS, max_prompt_length=64, max_completion_length=8)
    assert encoded["completion_ids"] == [encode_prompt_completion(tok, MESSAGES, t)["completion_ids"]
                                         for t in ("Good.", "Bad.")]
    with pytest.raises(ValueError, match="need the policy's tokenizer"):
        sample_groups(samples, judged, rewards="judge")


@pytest.fixture(scope="module")
def eos_chat_dir(tmp_path_factory):
    """The ChatML tiny model, edited so that "<|im_end|>" gets a few % raw probability after any context:
    short samples, most of them finished by the end-of-turn token (as in test_vllm_backend.py)."""
    from rayalign.tiny import build_tiny_model, save_tiny_model

    model, tokenizer = build_tiny_model(chat_template="chatml")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[IM_END, 0] = 0.45
    return save_tiny_model(model, tokenizer, tmp_path_factory.mktemp("chat_eos"))


def _forward_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return logps[torch.arange(len(prompt) - 1, ids.shape[1] - 1), torch.tensor(completion)]


def test_one_tokenization_across_stages(eos_chat_dir, tmp_path):
    from rayalign.data import load_rows
    from rayalign.data_kind import PAIRS
    from rayalign.encode import encode_row
    from rayalign.judge import Judge, write_judged
    from rayalign.models import load_model, load_tokenizer
    from rayalign.prepare import PairEncoder, ReferenceScorer
    from rayalign.samplers import HFSampler
    from rayalign.sft import sft_batches

    config = load_config(None, ["generate.num_samples=8", "generate.max_new_tokens=6", "generate.seed=0",
                                "data.max_prompt_length=64", "data.max_completion_length=16"])
    lengths = {"max_prompt_length": 64, "max_completion_length": 16}
    tok, model = load_tokenizer(eos_chat_dir), load_model(eos_chat_dir)
    expected_prompt = prompt_ids(tok, MESSAGES)[0]
    assert expected_prompt == tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"]

    # 1. HF generation conditions on exactly these prompt ids: its log-probs are a forward pass over them.
    samples = HFSampler(str(eos_chat_dir), config.generate).sample([MESSAGES], [0])[0]
    stopped = [s for s in samples if s.finish_reason == "stop"]
    assert len(stopped) >= 4
    for s in samples:
        assert torch.allclose(torch.tensor(s.logprobs), _forward_logprobs(model, expected_prompt, s.token_ids),
                              atol=1e-5)
    # 2. A finished sample ends at "<|im_end|>", and its ids are what every later stage computes from its text,
    # unless the model sampled a tokenization of that text other than the tokenizer's own.
    same = 0
    for s in stopped:
        assert s.token_ids[-1] == IM_END and IM_END not in s.token_ids[:-1]
        downstream = encode_prompt_completion(tok, MESSAGES, s.text, **lengths)["completion_ids"]
        canonical = tok(s.text, add_special_tokens=False)["input_ids"] == s.token_ids[:-1]
        assert (downstream == s.token_ids) == canonical
        same += canonical
    assert same >= len(stopped) - 1  # the random model's odd byte tokens aside: the normal case

    # 3. The judge (also the evaluation pass) encodes (prompt, text) with the same function, and scores the
    # generator's own tokens: its policy log-prob of a sample is the sum of the sampled log-probs.
    texts = [s.text for s in samples] + ["It was great.", "It was awful."]
    batch = pd.DataFrame({"prompt_id": [0], **prompt_columns([MESSAGES]), "texts": [texts]})
    judge = Judge(str(eos_chat_dir), str(eos_chat_dir), config)
    judge_prompts, judge_completions = judge.encode(batch)
    assert judge_prompts == [expected_prompt] * len(texts)
    assert judge_completions == [encode_prompt_completion(tok, MESSAGES, t, **lengths)["completion_ids"]
                                 for t in texts]
    judged = judge(batch)
    for k, s in enumerate(samples):
        if judge_completions[k] == s.token_ids:
            assert judged["policy_logps"][0][k] == pytest.approx(sum(s.logprobs), abs=1e-4)

    # 4. The judged pair as training data: written as rendered text, read back like any pair file, tokenized
    # by training's encoder (oracle and workers) and by PairEncoder (reference scoring) to the judge's ids.
    judged = judged.assign(chosen_index=len(texts) - 2, rejected_index=len(texts) - 1, dropped="",
                           chosen=render_completion(tok, MESSAGES, "It was great."),
                           rejected=render_completion(tok, MESSAGES, "It was awful."))
    write_judged(judged, tmp_path / "judged.parquet")
    (row,) = load_rows(tmp_path / "judged.parquet", tokenizer=tok).rows
    assert row["prompt"] == RENDERED
    encoded = encode_row(tok, row, PAIRS, **lengths)
    assert encoded["prompt_ids"] == expected_prompt
    assert (encoded["chosen_ids"], encoded["rejected_ids"]) == (judge_completions[-2], judge_completions[-1])
    frame = pd.DataFrame({"pair_index": [0], **{k: [row[k]] for k in ("prompt", "chosen", "rejected")}})
    prepared = PairEncoder(str(eos_chat_dir), 64, 16, kind=PAIRS)(frame)
    assert [list(prepared[c][0]) for c in ("prompt_ids", "chosen_ids", "rejected_ids")] == [
        encoded["prompt_ids"], encoded["chosen_ids"], encoded["rejected_ids"]]
    # the reference scorer's log-probs of those ids: the judge's (same model as its SFT side here)
    scored = ReferenceScorer(str(eos_chat_dir), config, tok.pad_token_id, kind=PAIRS)(prepared)
    assert scored["ref_chosen_logps"][0] == pytest.approx(judged["sft_logps"][0][-2], abs=1e-4)
    assert scored["ref_rejected_logps"][0] == pytest.approx(judged["sft_logps"][0][-1], abs=1e-4)

    # 5. A conversational data file of the same turns, and SFT on the rendered pair: the same ids again.
    (tmp_path / "c.jsonl").write_text(json.dumps(
        {"prompt": MESSAGES, "chosen": [{"role": "assistant", "content": "It was great."}],
         "rejected": [{"role": "assistant", "content": "It was awful."}]}) + "\n")
    data = load_rows(tmp_path / "c.jsonl", tokenizer=tok)
    assert data.format == "conversational" and encode_row(tok, data.rows[0], PAIRS, **lengths) == encoded
    ids, _, labels = next(sft_batches(tok, [(row["prompt"], row["chosen"])], batch_size=1, epochs=1, seed=0,
                                      max_length=128))
    assert ids[0].tolist() == expected_prompt + judge_completions[-2]
    assert labels[0].tolist() == [-100] * len(expected_prompt) + judge_completions[-2]


@pytest.mark.slow
def test_ray_data_generation_and_judging_of_message_prompts(chat_model_dir, tmp_path):
    """The loop's Ray Data pass with a string and a message-list prompt: the prompt_messages column survives
    Ray Data and Parquet, and the judged pair file trains on the ids the Judge scored."""
    import ray

    from rayalign.data import load_rows
    from rayalign.data_kind import PAIRS
    from rayalign.encode import encode_row
    from rayalign.generate import write_samples
    from rayalign.judge import write_judged
    from rayalign.models import load_tokenizer
    from rayalign.ray_session import init_ray
    from rayalign.stages import judged_pass, read_sample_groups
    from rayalign.tiny import make_tiny_model

    sft = make_tiny_model(tmp_path / "sft", chat_template="chatml", seed=1)  # same tokenizer, other weights
    config = load_config(None, ["generate.num_samples=3", "generate.max_new_tokens=5", "generate.num_actors=1",
                                "judge.num_actors=1", "data.max_prompt_length=64", "data.max_completion_length=8"])
    prompts = pd.DataFrame({"prompt_id": [0, 1], **prompt_columns(["I think the movie", MESSAGES])})
    started = not ray.is_initialized()
    if started:
        init_ray()  # joins the suite's shared head (RAY_ADDRESS), else a local Ray
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = judged_pass(config, prompts, model=str(chat_model_dir), sft_path=str(sft))
    finally:
        if started:
            ray.shutdown()
    tok = load_tokenizer(chat_model_dir)
    samples = write_samples(rows, tmp_path / "samples.parquet")
    assert list(samples["prompt_messages"]) == [False] * 3 + [True] * 3
    groups = read_sample_groups(tmp_path / "samples.parquet")
    assert prompt_values(groups) == ["I think the movie", MESSAGES]
    rows = rows.sort_values("prompt_id").reset_index(drop=True)
    assert list(rows["rendered_prompt"]) == ["I think the movie", RENDERED]
    chat = rows.iloc[1]
    assert chat["chosen_text"] == chat["texts"][chat["chosen_index"]]
    assert chat["chosen"] == render_completion(tok, MESSAGES, chat["chosen_text"])
    assert list(rows["dropped"]) == ["", ""]  # 5 random tokens: not empty or identical; random rewards: no tie
    write_judged(rows, tmp_path / "judged.parquet")
    pairs = load_rows(tmp_path / "judged.parquet", tokenizer=tok).rows
    assert [p["prompt"] for p in pairs] == ["I think the movie", RENDERED]
    encoded = encode_row(tok, pairs[1], PAIRS, max_prompt_length=64, max_completion_length=8)
    expected = encode_prompt_completion(tok, MESSAGES, chat["chosen_text"], max_prompt_length=64,
                                        max_completion_length=8)
    assert (encoded["prompt_ids"], encoded["chosen_ids"]) == (expected["prompt_ids"], expected["completion_ids"])
