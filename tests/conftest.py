import sys
from pathlib import Path

import pytest
import torch

# Tests import shared helpers (hf_models.py) from this folder.
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random-init checkpoint with a 512-token BPE (the training verbs' tests start
    from it)."""
    from pydoc_data.topics import topics

    from lifecycle_cli.checkpoint import save_checkpoint
    from lifecycle_cli.config import Config
    from lifecycle_cli.model import GPT
    from lifecycle_cli.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("base")
    tok = train_bpe(None, 512, folder / "tok", texts=list(topics.values()))
    config = Config(
        name="tiny", block_size=128, vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4,
        n_query_groups=2, intermediate_size=128, norm="rmsnorm", mlp="swiglu", bias=False,
        tie_embeddings=True, hf_model_type="llama",
    )  # fmt: skip
    torch.manual_seed(0)
    save_checkpoint(folder / "ckpt", GPT(config), tokenizer_dir=folder / "tok")
    return folder / "ckpt"
