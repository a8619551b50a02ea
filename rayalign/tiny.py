"""Build a tiny, randomly initialised Llama model and its byte-level BPE tokenizer, fully offline.

`make_tiny_model(out_dir)` writes a normal Hugging Face directory (safetensors weights, config,
generation config, tokenizer with a chat template) that `AutoModelForCausalLM.from_pretrained`,
`AutoTokenizer.from_pretrained` and vLLM load like any hub model. Tests, CPU smoke runs and the
`rayalign make-tiny-model` command use it so nothing is ever downloaded.

Choices that later stages rely on:
- head_dim is fixed at 32 (vLLM's CPU attention rejects smaller heads), so `hidden == heads * 32`.
- "<|endoftext|>" is bos, eos and pad at once. pad == eos is safe because every consumer masks padding
  with the attention mask and excludes it from the loss by the completion mask. The one trap: a mask
  derived from `ids != pad_id` would also drop a real eos, so masks must come from the tokenizer.
- The digits 0-9, "<" and ">" are split off before BPE, so each is always exactly one token, in any
  context (GDPO-style scoring reads a digit token and a ">" token). Merges never contain them.
- The tokenizer depends only on the corpus and vocab_size: training BPE uses no randomness, and
  `seed` only seeds the weights, so models with different seeds share one tokenizer.
- No BOS is prepended on encode (GPT-2 style); the chat template is Anthropic-HH style.
- `chat_template="chatml"` (`--chat-template chatml`) instead writes a ChatML template laid out as Qwen's:
  "<|im_start|>" and "<|im_end|>" are added special tokens (ids 1 and 2, right after "<|endoftext|>"),
  eos is "<|im_end|>" (the end of every turn, where generation stops), pad and bos stay "<|endoftext|>",
  and the generation prompt is "<|im_start|>assistant\n". The default ("hh") files are unchanged by it.

It does not train the model, download anything, or import ray/vllm/deepspeed itself (transformers'
`save_pretrained` imports deepspeed on its own when it is installed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay inside the functions that need them
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

HEAD_DIM = 32
EOS_TOKEN = "<|endoftext|>"
# Characters that must each stay a single token: isolated by the pre-tokenizer, so BPE never merges them.
ISOLATED_CHARS = "0123456789<>"
BYTE_ALPHABET_SIZE = 256

# Anthropic-HH turns. The generation prompt ends at "Assistant:" without a space, so a completion starts
# with " ..." and prompt + completion tokenizes exactly like a rendered conversation.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '\\n\\nHuman: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\nAssistant: ' + message['content'] }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)

# ChatML, as Qwen2.5 lays it out (without Qwen's default system message): every turn is
# "<|im_start|>{role}\n{content}<|im_end|>\n"; an assistant completion is "{content}<|im_end|>\n".
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TEMPLATES = ("hh", "chatml")

_SUBJECTS = [
    "the movie", "this book", "the food", "my day", "the weather", "that song", "the service", "our trip",
    "the game", "this phone", "the hotel", "the concert", "her painting", "his speech", "the garden",
    "the lecture",
]
_POSITIVE = ["great", "wonderful", "delightful", "excellent", "amazing", "lovely", "charming", "brilliant",
             "pleasant", "fantastic"]
_NEGATIVE = ["terrible", "awful", "boring", "dreadful", "horrible", "disappointing", "annoying", "mediocre",
             "painful", "dull"]
_ASPECTS = ["story", "music", "price", "staff", "ending", "colors", "pacing", "characters", "location",
            "atmosphere"]
_TEMPLATES = [
    "{S} was {w}.",
    "I think {s} is {w} because the {a} was {w}.",
    "Honestly, {s} felt {w} to me, and I would rate it {n} out of 5.",
    "\n\nHuman: How was {s}?\n\nAssistant: It was {w}. The {a} was {w}.",
    "\n\nHuman: Write a {mood} review of {s}.\n\nAssistant: <review>{S} was {w}.</review> Score: {n}",
]


def builtin_corpus() -> list[str]:
    """A few hundred short English documents with sentiment words and HH dialogue turns.

    Enumerated, not sampled, so it is identical on every machine and needs no seed.
    """
    docs = []
    words = [(w, "positive") for w in _POSITIVE] + [(w, "negative") for w in _NEGATIVE]
    for i, (subject, (word, mood)) in enumerate(itertools.product(_SUBJECTS, words)):
        template = _TEMPLATES[i % len(_TEMPLATES)]
        rating = (4 + i % 2) if mood == "positive" else (1 + i % 2)
        docs.append(template.format(s=subject, S=subject.capitalize(), w=word, mood=mood,
                                    a=_ASPECTS[i % len(_ASPECTS)], n=rating))
    return docs


def read_corpus(path: str | Path) -> list[str]:
    """Documents from a text file (one per line, blank lines skipped) or a .jsonl file with a "text" field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"corpus file {str(path)!r} does not exist")
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
                docs.append(row["text"])
            else:
                docs.append(line.rstrip("\n"))
    if not docs:
        raise ValueError(f"corpus file {str(path)!r} has no documents")
    return docs


def train_bpe(docs: list[str], vocab_size: int = 512, special_tokens: tuple[str, ...] = (EOS_TOKEN,)):
    """Train the raw byte-level BPE `tokenizers.Tokenizer` (no transformers import); deterministic.

    `vocab_size` is an upper bound: BPE stops early when the corpus has no pair left to merge. The byte
    alphabet is always complete, so any text encodes. `special_tokens` get the first ids, in order.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < BYTE_ALPHABET_SIZE + 1:
        raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet plus eos "
                         f"({BYTE_ALPHABET_SIZE + 1})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(f"[{ISOLATED_CHARS}]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def train_tokenizer(docs: list[str], vocab_size: int = 512, max_length: int = 512,
                    chat_template: str = "hh") -> PreTrainedTokenizerFast:
    """`train_bpe` wrapped as a transformers tokenizer with eos/bos/pad and the chat template.

    `chat_template`: "hh" (eos = bos = pad = "<|endoftext|>") or "chatml" (see the module docstring).
    Saved padding side is "right" (training); callers choose per use with
    `rayalign.models.load_tokenizer(padding_side=...)`.
    """
    from transformers import PreTrainedTokenizerFast

    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"chat_template must be one of {', '.join(CHAT_TEMPLATES)}, got {chat_template!r}")
    if chat_template == "chatml":
        specials = {"eos_token": IM_END, "extra_special_tokens": [IM_START, IM_END], "chat_template": CHATML_TEMPLATE}
        bpe = train_bpe(docs, vocab_size, special_tokens=(EOS_TOKEN, IM_START, IM_END))
    else:
        specials = {"eos_token": EOS_TOKEN, "chat_template": CHAT_TEMPLATE}
        bpe = train_bpe(docs, vocab_size)
    # padding_side goes to the constructor: assigning it afterwards is not written by save_pretrained.
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN, padding_side="right",
        model_max_length=max_length, clean_up_tokenization_spaces=False, **specials,
    )


def build_tiny_model(
    *, corpus: str | Path | None = None, layers: int = 2, hidden: int = 64, heads: int = 2,
    intermediate: int | None = None, vocab_size: int = 512, max_position: int = 512, seed: int = 0,
    chat_template: str = "hh",
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """In-memory (model, tokenizer); see `make_tiny_model` for the arguments. The model is in eval mode."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if heads < 1 or hidden != heads * HEAD_DIM:
        raise ValueError(f"hidden ({hidden}) must equal heads ({heads}) * head_dim ({HEAD_DIM}); "
                         f"vLLM's CPU attention needs head_dim 32, e.g. --heads 2 --hidden 64")
    if layers < 1 or max_position < 1 or (intermediate is not None and intermediate < 1):
        raise ValueError(f"layers ({layers}), max_position ({max_position}) and intermediate "
                         f"({intermediate}) must be positive")
    docs = read_corpus(corpus) if corpus is not None else builtin_corpus()
    tokenizer = train_tokenizer(docs, vocab_size, max_length=max_position, chat_template=chat_template)
    # "hh": one id for all three. "chatml": eos "<|im_end|>" ends a turn, "<|endoftext|>" is bos and pad.
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, head_dim=HEAD_DIM, intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_position, bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id,
        # Untied: embeddings and lm_head are separate tensors, the layout most real checkpoints use.
        tie_word_embeddings=False, dtype="float32",
    )
    # fork_rng: seed the initialisation without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
    return model.eval(), tokenizer


def count_parameters(model) -> int:
    """Number of parameters (each tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_tiny_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Write model (safetensors) + tokenizer + a one-line README into `out_dir`, creating it."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    cfg = model.config
    (out / "README.md").write_text(
        f"Tiny random LlamaForCausalLM for tests, written by `rayalign make-tiny-model`: "
        f"{count_parameters(model)} parameters, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads, vocab {cfg.vocab_size}. Untrained: its outputs are noise.\n"
    )
    return out


def make_tiny_model(
    out_dir: str | Path, *, corpus: str | Path | None = None, layers: int = 2, hidden: int = 64,
    heads: int = 2, intermediate: int | None = None, vocab_size: int = 512, max_position: int = 512,
    seed: int = 0, chat_template: str = "hh",
) -> Path:
    """Build the tiny model and tokenizer and save them as a Hugging Face directory; return its path.

    corpus: text file (one document per line) or .jsonl with a "text" field; None uses `builtin_corpus()`.
    hidden must be heads * 32. intermediate defaults to 4 * hidden. vocab_size is an upper bound (see
    `train_tokenizer`); the model's vocab is exactly len(tokenizer). Same arguments give byte-identical
    files; `seed` changes the weights only. `chat_template`: "hh" or "chatml" (see the module docstring).
    """
    model, tokenizer = build_tiny_model(corpus=corpus, layers=layers, hidden=hidden, heads=heads,
                                        intermediate=intermediate, vocab_size=vocab_size,
                                        max_position=max_position, seed=seed, chat_template=chat_template)
    return save_tiny_model(model, tokenizer, out_dir)


def add_make_tiny_model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `make-tiny-model` arguments to `parser` (a subcommand parser in rayalign.cli)."""
    parser.add_argument("out_dir", help="directory to write the model and tokenizer into")
    parser.add_argument("--corpus", default=None,
                        help="tokenizer training text: one document per line, or .jsonl with 'text'")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64, help="must equal heads * 32")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 * hidden)")
    parser.add_argument("--vocab-size", type=int, default=512, help="upper bound on the BPE vocabulary")
    parser.add_argument("--max-position", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights (the tokenizer has no RNG)")
    parser.add_argument("--chat-template", choices=CHAT_TEMPLATES, default="hh",
                        help="hh: '\\n\\nHuman:/\\n\\nAssistant:' turns, eos <|endoftext|>; chatml: Qwen-style "
                             "<|im_start|>/<|im_end|> special tokens, eos <|im_end|>")
    return parser


def run_make_tiny_model(args: argparse.Namespace) -> int:
    """Entry point for `rayalign make-tiny-model`: build, save, print a summary; returns the exit code.

    A bad argument (e.g. hidden != heads * 32, a missing corpus) prints the reason and returns 2.
    """
    try:
        model, tokenizer = build_tiny_model(
            corpus=args.corpus, layers=args.layers, hidden=args.hidden, heads=args.heads,
            intermediate=args.intermediate, vocab_size=args.vocab_size, max_position=args.max_position,
            seed=args.seed, chat_template=args.chat_template,
        )
    except ValueError as e:
        print(f"make-tiny-model: error: {e}", file=sys.stderr)
        return 2
    out = save_tiny_model(model, tokenizer, args.out_dir)
    print(f"wrote {out}: {count_parameters(model):,} parameters, vocab {len(tokenizer)}, "
          f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads, {args.chat_template} chat template")
    return 0
