"""The quickstart task's gold reward and data generators."""

from __future__ import annotations

from rayalign.tasks.sentiment import gold_pairs, gold_reward, make_prompts, sft_corpus


def test_gold_reward_counts_lexicon_words():
    """'wonderful' and 'great' are positive, 'boring' negative: 2 - 1 = 1; case and punctuation ignored."""
    assert gold_reward(" The story was Wonderful. The music is great and the plot is boring.") == 1.0
    assert gold_reward(" The ending was long.") == 0.0
    assert gold_reward("greatness") == 0.0  # whole words only


def test_generators_are_seeded_and_pairs_are_strict():
    assert make_prompts(5, seed=3) == make_prompts(5, seed=3)
    assert sft_corpus(4, seed=1) == sft_corpus(4, seed=1)
    pairs = gold_pairs(64, seed=0)
    assert pairs == gold_pairs(64, seed=0)
    for pair in pairs:
        assert pair["prompt"].startswith("\n\nHuman: ") and pair["prompt"].endswith("\n\nAssistant:")
        assert gold_reward(pair["chosen"]) == pair["score_chosen"] > pair["score_rejected"]
        assert pair["chosen"] != pair["rejected"]


def test_sft_corpus_has_varied_gold_reward():
    rewards = {gold_reward(text) for text in sft_corpus(200, seed=0)}
    assert min(rewards) < 0 < max(rewards)
