"""`rayalign.sft.run_sft`: the setup SFT never steps on a non-finite gradient and saves nothing then."""

import pytest
import torch

from rayalign.models import load_model
from rayalign.sft import run_sft

EXAMPLES = [("Review: ", "a fine film."), ("Review: ", "dull and long.")] * 4


def test_non_finite_gradient_stops_the_sft_and_saves_nothing(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = float("inf")  # every forward turns non-finite
    model.save_pretrained(broken)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).exists():
            (broken / name).write_bytes((tiny_model_dir / name).read_bytes())
    out = tmp_path / "sft"
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient norm at step 1"):
        run_sft(str(broken), EXAMPLES, out, epochs=1, batch_size=4, log=lambda _: None)
    assert not out.exists()


def test_a_finite_sft_saves_the_model(tiny_model_dir, tmp_path):
    out = run_sft(str(tiny_model_dir), EXAMPLES, tmp_path / "sft", epochs=1, batch_size=4, log=lambda _: None)
    assert (out / "config.json").is_file()
