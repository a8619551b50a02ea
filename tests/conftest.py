"""Shared pytest fixtures for the whole suite.

Sets HF_HUB_OFFLINE=1 at import so no test can ever download, and provides `tiny_model_dir`: one tiny
random Llama model + tokenizer (rayalign.tiny defaults) built once per session, in about a second.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
# The tokenizers library warns (and can deadlock) when a process forks after using its thread pool.
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path to a Hugging Face directory holding the default tiny model; treat it as read-only."""
    from rayalign.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))
