"""What the in-process experiments on the quickstart's sentiment task share: their pi_SFT, an HF sampler at a
given temperature, and results and figures written the same way. No statistics (`experiments.stats`), no
training or measuring of their own."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_sft_arguments(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """--sft-examples, --sft-epochs (the quickstart's pi_SFT), --max-new-tokens and --out."""
    parser.add_argument("--sft-examples", type=int, default=1200)
    parser.add_argument("--sft-epochs", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--out", type=Path, default=default_out)


def quickstart_sft(args: argparse.Namespace):
    """The quickstart's SFT'd tiny Llama in args.out/sft (built once; `rayalign.loop.build_task_sft`):
    (its path, its tokenizer, the model frozen in eval mode)."""
    from rayalign.config_loader import load_config
    from rayalign.loop import build_task_sft
    from rayalign.models import load_model, load_tokenizer
    from rayalign.stage_storage import StageStorage

    args.out.mkdir(parents=True, exist_ok=True)
    config = load_config("configs/quickstart.yaml", [f"loop.sft_examples={args.sft_examples}",
                                                     f"loop.sft_epochs={args.sft_epochs}"])
    sft = str(build_task_sft(config, args.out, StageStorage(config)))
    return sft, load_tokenizer(sft), load_model(sft).requires_grad_(False).eval()


def make_sampler(model_path: str, *, num_samples: int, temperature: float, seed: int, max_new_tokens: int):
    """`rayalign.samplers.HFSampler` at `temperature`, top-p 1 (a live model's weights are pushed to it)."""
    from rayalign.config import GenerateConfig
    from rayalign.samplers import HFSampler

    return HFSampler(model_path, GenerateConfig(num_samples=num_samples, temperature=temperature, top_p=1.0,
                                                max_new_tokens=max_new_tokens, seed=seed))


def save_results(path: Path, args: argparse.Namespace, **content) -> Path:
    """results.json: the arguments (as strings) and `content`."""
    path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **content}, indent=2) + "\n")
    return path


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
