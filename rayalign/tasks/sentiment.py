"""The embedded quickstart task: positive movie reviews, scored by a word lexicon.

A prompt asks for a short review of a (made-up) film; a response is a few short sentences. The gold
reward is the number of positive lexicon words minus the number of negative ones, in the spirit of the
IMDb controlled-sentiment task of the DPO, EXO and MallowsPO papers, but readable by a person: you can
check any score by counting words. A tiny model SFT'd on mixed reviews samples both kinds, so its
samples vary in gold reward and preference learning has something to find.

Everything is seeded and needs no download. This module is plain Python (no torch): it makes text.
"""

from __future__ import annotations

import random
import re

POSITIVE = (
    "wonderful", "brilliant", "great", "moving", "beautiful", "funny", "charming", "superb",
    "delightful", "excellent", "gripping", "warm", "clever", "lovely", "fantastic", "touching",
)
NEGATIVE = (
    "boring", "awful", "dull", "terrible", "clumsy", "tedious", "bad", "weak",
    "messy", "painful", "bland", "silly", "poor", "flat", "annoying", "forgettable",
)
NEUTRAL = ("long", "quiet", "loud", "old", "new", "short", "strange", "familiar", "slow", "dark")
NOUNS = ("story", "acting", "music", "ending", "script", "cast", "camera work", "dialogue", "pacing", "plot")
FILMS = (
    "The Silver Harbor", "Night Train", "A Quiet Field", "The Last Lantern", "Paper Moons", "Red Valley",
    "The Glass Garden", "Winter Kings", "Small Hours", "The River Clock", "Blue Orchard", "Stone Letters",
    "The Long Summer", "Hollow Bells", "Marching Clouds", "The Copper Road", "Salt and Ash", "Open Doors",
    "The Ninth Wave", "Lamplight", "Green Fire", "The Tin Sky", "North of Noon", "Velvet Rain",
)
PROMPT_TEMPLATES = (
    "Write a short review of the movie {film}.",
    "What did you think of {film}?",
    "Give me your opinion of the film {film}.",
    "Review {film} in a few sentences.",
)
SENTENCE_TEMPLATES = (
    "The {noun} was {adj}.",
    "I found the {noun} {adj}.",
    "Overall it felt {adj}.",
    "The {noun} is {adj} and the {noun2} is {adj2}.",
)
_WORD = re.compile(r"[a-z]+")
_POSITIVE_SET, _NEGATIVE_SET = frozenset(POSITIVE), frozenset(NEGATIVE)


def gold_reward(text: str) -> float:
    """Positive lexicon words minus negative ones (case-insensitive, whole words)."""
    words = _WORD.findall(text.lower())
    return float(sum(w in _POSITIVE_SET for w in words) - sum(w in _NEGATIVE_SET for w in words))


def format_prompt(question: str) -> str:
    """The raw HH dialogue format the rest of the stack understands."""
    return f"\n\nHuman: {question}\n\nAssistant:"


def make_prompts(n: int, *, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [format_prompt(rng.choice(PROMPT_TEMPLATES).format(film=rng.choice(FILMS))) for _ in range(n)]


def _adjective(rng: random.Random, positive_share: float) -> str:
    roll = rng.random()
    if roll < 0.2:
        return rng.choice(NEUTRAL)
    return rng.choice(POSITIVE) if roll < 0.2 + 0.8 * positive_share else rng.choice(NEGATIVE)


def make_response(rng: random.Random, *, positive_share: float, sentences: int = 2) -> str:
    """A review whose adjectives are positive with probability about `positive_share`."""
    parts = []
    for _ in range(sentences):
        noun, noun2 = rng.sample(NOUNS, 2)
        parts.append(rng.choice(SENTENCE_TEMPLATES).format(
            noun=noun, noun2=noun2, adj=_adjective(rng, positive_share), adj2=_adjective(rng, positive_share)))
    return " " + " ".join(parts)


def sft_examples(n: int, *, seed: int) -> list[tuple[str, str]]:
    """(prompt, review) pairs of mixed sentiment: what the SFT model imitates."""
    rng = random.Random(seed)
    prompts = make_prompts(n, seed=seed + 1)
    return [(p, make_response(rng, positive_share=rng.random(), sentences=rng.randint(1, 3))) for p in prompts]


def sft_corpus(n: int, *, seed: int) -> list[str]:
    """Prompt + review texts (the tokenizer's training corpus)."""
    return [p + r for p, r in sft_examples(n, seed=seed)]


def gold_pairs(n: int, *, seed: int) -> list[dict]:
    """`n` gold-labelled pairs {prompt, chosen, rejected, score_chosen, score_rejected}; ties re-drawn."""
    rng = random.Random(seed)
    prompts = make_prompts(n, seed=seed + 1)
    pairs = []
    for prompt in prompts:
        while True:
            a = make_response(rng, positive_share=rng.random())
            b = make_response(rng, positive_share=rng.random())
            ra, rb = gold_reward(a), gold_reward(b)
            if ra != rb and a != b:
                break
        (chosen, rc), (rejected, rr) = sorted([(a, ra), (b, rb)], key=lambda item: -item[1])
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                      "score_chosen": rc, "score_rejected": rr})
    return pairs
