"""A synthetic GlobalOpinionQA-like task for GDPO (ALGORITHMS.md §3, "Synthetic opinion task").

Survey questions ("How important is religion in your life?") each offer 2-5 options, mapped to distinct
levels of one shared scale of L = 6 levels (0 = the most negative/least, 5 = the most positive/most). A few
fictional countries ("groups") each hold their own target distribution p* ~ Dirichlet(1) over the levels a
question has (p* = 0 for the levels it lacks). A prompt asks how someone from a group would answer; a
completion states a belief and then answers:

    prompt      "\\n\\nHuman: How would someone from Borovia answer this question: How important is ...?
                 \\n\\nAssistant:"
    completion  "3<somewhat important> I would say somewhat important, when it comes to religion."

`gdpo_rows` draws beliefs b ~ p* and writes belief-conditioned pairs in the "gdpo" data format (chosen = an
answer consistent with b, rejected = an answer of another option of the same question); `sft_examples` are
the prompts with their chosen completions; `test_prompts` are every (group, question) under a prompt
phrasing the rows never use, with their p*. Everything is seeded: the same seed gives the same task.

This module is plain Python (no torch, no files): it makes text. `write_task` writes JSONL files for the
CLI (`rayalign train`/`tune`); the experiment lives in experiments/gdpo_opinions.py.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

LEVELS = 6
GROUPS = ("Arland", "Borovia", "Cestia", "Dunmarsh")
# Option sets: (level on the shared scale, label). Labels never contain '>' (it closes the belief prefix).
SCALES = {
    "importance": ("How important is {topic} in your life?",
                   ((5, "very important"), (3, "somewhat important"), (1, "not too important"),
                    (0, "not at all important"))),
    "agreement": ("Do you agree that {topic} makes your country stronger?",
                  ((5, "strongly agree"), (4, "agree"), (2, "neither agree nor disagree"), (1, "disagree"),
                   (0, "strongly disagree"))),
    "influence": ("Is the influence of {topic} on your country good or bad?",
                  ((5, "very good"), (3, "somewhat good"), (2, "somewhat bad"), (0, "very bad"))),
    "trust": ("How much do you trust {topic}?", ((5, "a lot"), (2, "not much"), (0, "not at all"))),
    "funding": ("Should {topic} get more public money?", ((5, "yes"), (0, "no"))),
    "future": ("Will {topic} be better or worse in ten years?",
               ((5, "better"), (3, "about the same"), (0, "worse"))),
}
TOPICS = (
    "religion", "family", "science", "democracy", "free trade", "the army", "newspapers", "the courts",
    "local shops", "public transport", "nuclear power", "tourism", "the internet", "labor unions",
    "big companies", "the police", "farming", "schools", "hospitals", "sports",
)
# How the rows ask; the test prompts use HELDOUT_TEMPLATE, which no row uses.
TEMPLATES = (
    "How would someone from {group} answer this question: {question}",
    "Imagine you live in {group}. {question}",
    "A survey asks people in {group}: {question} What is a typical answer?",
)
HELDOUT_TEMPLATE = "What would a person from {group} say? {question}"
ANSWERS = (
    " My answer is {label}.",
    " I would say {label}, when it comes to {topic}.",
    " For {topic}, {label}.",
)


@dataclass(frozen=True)
class Question:
    qid: int
    text: str
    topic: str
    options: tuple[tuple[int, str], ...]  # (level, label), distinct levels


@dataclass(frozen=True)
class OpinionTask:
    """The questions, the groups and each (group, qid)'s target distribution over the L levels."""

    questions: tuple[Question, ...]
    groups: tuple[str, ...]
    targets: dict[tuple[str, int], tuple[float, ...]]
    seed: int


def format_prompt(text: str) -> str:
    """The raw HH dialogue format the rest of the stack understands."""
    return f"\n\nHuman: {text}\n\nAssistant:"


def make_task(*, seed: int = 0, num_questions: int = 50, groups: tuple[str, ...] = GROUPS) -> OpinionTask:
    """`num_questions` (scale, topic) questions and a Dirichlet(1) target per (group, question); seeded."""
    rng = random.Random(seed)
    combos = [(scale, topic) for scale in SCALES for topic in TOPICS]
    if not 1 <= num_questions <= len(combos):
        raise ValueError(f"num_questions must be in 1..{len(combos)}; got {num_questions}")
    questions = []
    for qid, (scale, topic) in enumerate(rng.sample(combos, num_questions)):
        template, options = SCALES[scale]
        questions.append(Question(qid, template.format(topic=topic), topic, options))
    targets = {}
    for group in groups:
        for q in questions:
            # Dirichlet(1) over the question's levels: normalised Exp(1) draws (p* = 0 elsewhere).
            draws = {level: rng.gammavariate(1.0, 1.0) for level, _ in q.options}
            total = sum(draws.values())
            targets[(group, q.qid)] = tuple(draws.get(level, 0.0) / total for level in range(LEVELS))
    return OpinionTask(tuple(questions), tuple(groups), targets, seed)


def completion(question: Question, level: int, phrasing: int) -> str:
    """The belief prefix and an answer: "{level}<{label}>" + answer phrasing `phrasing`."""
    label = dict(question.options)[level]
    return f"{level}<{label}>" + answer(question, level, phrasing)


def answer(question: Question, level: int, phrasing: int) -> str:
    """The answer text of option `level` (after the belief prefix), in phrasing `phrasing`."""
    label = dict(question.options)[level]
    return ANSWERS[phrasing % len(ANSWERS)].format(label=label, topic=question.topic)


def _draw(rng: random.Random, probs: tuple[float, ...]) -> int:
    return rng.choices(range(LEVELS), weights=probs)[0]


def gdpo_rows(task: OpinionTask, *, per_prompt: int, seed: int, heldout: bool = False) -> list[dict]:
    """`per_prompt` rows per (group, question) in the "gdpo" format, beliefs b ~ p*; seeded.

    Each row: a training phrasing of the prompt (`heldout=True`: the held-out one), belief b ~ p*, chosen =
    an answer of b, rejected = an answer of another option of the question (uniform), both in a random
    phrasing. `group` and `question` (the qid) are kept for per-group analysis.
    """
    rng = random.Random(seed)
    rows = []
    for group in task.groups:
        for q in task.questions:
            target = task.targets[(group, q.qid)]
            labels = dict(q.options)
            for _ in range(per_prompt):
                template = HELDOUT_TEMPLATE if heldout else rng.choice(TEMPLATES)
                belief = _draw(rng, target)
                other = rng.choice([level for level, _ in q.options if level != belief])
                rows.append({
                    "prompt": format_prompt(template.format(group=group, question=q.text)),
                    "target": list(target), "belief": belief, "belief_text": labels[belief],
                    "chosen": answer(q, belief, rng.randrange(len(ANSWERS))),
                    "rejected": answer(q, other, rng.randrange(len(ANSWERS))),
                    "rejected_belief": other, "rejected_belief_text": labels[other],
                    "group": group, "question": q.qid,
                })
    return rows


def sft_examples(rows: list[dict]) -> list[tuple[str, str]]:
    """(prompt, chosen completion) pairs: "{belief}<{belief_text}>" + chosen answer, what SFT imitates."""
    return [(r["prompt"], f"{r['belief']}<{r['belief_text']}>" + r["chosen"]) for r in rows]


def test_prompts(task: OpinionTask) -> list[dict]:
    """Every (group, question) in the held-out phrasing: {prompt, group, question, target}."""
    return [{"prompt": format_prompt(HELDOUT_TEMPLATE.format(group=group, question=q.text)), "group": group,
             "question": q.qid, "target": list(task.targets[(group, q.qid)])}
            for group in task.groups for q in task.questions]


def corpus(task: OpinionTask, rows: list[dict]) -> list[str]:
    """Texts for the tiny model's tokenizer: every row's prompt + chosen completion, and every test prompt
    (so the held-out phrasing tokenizes with merges, not bytes). Digits, '<' and '>' stay single tokens
    whatever the corpus (`rayalign.tiny` isolates them)."""
    return [p + c for p, c in sft_examples(rows)] + [t["prompt"] for t in test_prompts(task)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_task(out_dir: Path, *, seed: int = 0, per_prompt: int = 8, eval_per_prompt: int = 1,
               num_questions: int = 50) -> dict[str, Path]:
    """Write train.jsonl (gdpo rows), eval.jsonl (gdpo rows on the held-out phrasing), sft.jsonl
    ({prompt, completion}), test_prompts.jsonl and corpus.jsonl ({text}) into `out_dir`; returns the paths."""
    task = make_task(seed=seed, num_questions=num_questions)
    train = gdpo_rows(task, per_prompt=per_prompt, seed=seed + 1)
    held = gdpo_rows(task, per_prompt=eval_per_prompt, seed=seed + 2, heldout=True)
    return {
        "train": write_jsonl(out_dir / "train.jsonl", train),
        "eval": write_jsonl(out_dir / "eval.jsonl", held),
        "sft": write_jsonl(out_dir / "sft.jsonl", [{"prompt": p, "completion": c} for p, c in sft_examples(train)]),
        "test_prompts": write_jsonl(out_dir / "test_prompts.jsonl", test_prompts(task)),
        "corpus": write_jsonl(out_dir / "corpus.jsonl", [{"text": t} for t in corpus(task, train)]),
    }
