"""Supervised fine-tuning of a (tiny) causal LM on prompt + response texts, in one process.

The quickstart uses it to turn the randomly initialised tiny model into pi_SFT, a model that writes
reviews of mixed sentiment in the task's format. The loss is next-token cross-entropy on the response
only (prompt tokens are context), the usual SFT recipe. It is a setup step for small models, not a
distributed trainer: real runs start from an SFT checkpoint made elsewhere.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from rayalign.io import atomic_directory


def sft_batches(tokenizer, examples: list[tuple[str, str]], *, batch_size: int, epochs: int, seed: int,
                max_length: int):
    """Right-padded (input_ids, attention_mask, labels) batches; labels are -100 on prompt and padding.

    Prompt and response are tokenized as every stage does (`rayalign.templating`): the response ends at eos."""
    from rayalign.templating import encode_prompt_completion

    encoded = []
    for prompt, response in examples:
        pair = encode_prompt_completion(tokenizer, prompt, response)
        p, r = pair["prompt_ids"], pair["completion_ids"]
        ids = (p + r)[:max_length]
        encoded.append((ids, [-100] * len(p) + r))
    rng = random.Random(seed)
    for _ in range(epochs):
        rng.shuffle(encoded)
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            length = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), length), tokenizer.pad_token_id)
            labels = torch.full((len(chunk), length), -100)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for i, (row, lab) in enumerate(chunk):
                ids[i, :len(row)], labels[i, :len(row)], mask[i, :len(row)] = (
                    torch.tensor(row), torch.tensor(lab[:len(row)]), 1)
            yield ids, mask, labels


def run_sft(model_path: str, examples: list[tuple[str, str]], out_dir: Path, *, epochs: int = 2,
            batch_size: int = 32, lr: float = 3e-3, seed: int = 0, max_length: int = 128, log=print,
            load=None) -> Path:
    """Fine-tune `model_path` on (prompt, response) pairs and save the result to `out_dir` atomically.

    load: the `rayalign.models.LoadOptions` of the run (None: the defaults)."""
    from rayalign.models import load_model, load_tokenizer, save_weights

    torch.manual_seed(seed)
    tokenizer, model = load_tokenizer(model_path, load), load_model(model_path, load)
    model.train()
    steps = epochs * -(-len(examples) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    started, loss = time.perf_counter(), torch.tensor(float("nan"))
    for step, (ids, mask, labels) in enumerate(sft_batches(tokenizer, examples, batch_size=batch_size,
                                                           epochs=epochs, seed=seed, max_length=max_length)):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        if not (math.isfinite(grad_norm) and math.isfinite(loss.item())):  # never step on an inf/nan gradient
            raise FloatingPointError(f"sft: non-finite loss or gradient norm at step {step + 1} "
                                     f"(loss {loss.item()}, gradient norm {grad_norm}); nothing was saved")
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0:
            log(f"sft step {step + 1}/{steps}: loss {loss.item():.3f}")
    log(f"sft done: {steps} steps in {time.perf_counter() - started:.1f} s, final loss {loss.item():.3f}")
    model.eval()
    with atomic_directory(out_dir) as tmp:
        save_weights(model, tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
