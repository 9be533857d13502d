import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hf_fixtures import make_hf_model, save_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random all-sparse, untied Switch checkpoint saved by transformers as sharded safetensors."""
    return save_checkpoint(make_hf_model("all_sparse_untied"), tmp_path_factory.mktemp("tiny") / "ckpt", "sharded")


@pytest.fixture(scope="session")
def tiny_mixed_bin(tmp_path_factory) -> Path:
    """Dense and sparse blocks mixed, tied embeddings, torch .bin shards with an index."""
    return save_checkpoint(make_hf_model("mixed", seed=1), tmp_path_factory.mktemp("tinybin") / "ckpt", "bin")
