"""Every supported family: our GPT gives transformers' logits, with and without the KV cache,
and a round trip back to Hugging Face format gives them again."""

from __future__ import annotations

import pytest
import torch
import transformers
from hf_models import FAMILIES, make_hf_model

from lifecycle_cli.checkpoint import load_model
from lifecycle_cli.zoo.convert import convert_hf_checkpoint, export_hf

ATOL = 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_both_ways(family, tmp_path):
    hf_model = make_hf_model(family, tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ours")
    model = load_model(tmp_path / "ours")
    torch.manual_seed(1)
    # Longer than the sliding windows (5) of the Mistral, Gemma 2 and Phi-3 configs.
    idx = torch.randint(0, hf_model.config.vocab_size, (3, 14))

    with torch.no_grad():
        expected = hf_model(idx).logits
        logits = model(idx)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)

    # Prefill 6 tokens, then decode one at a time through the static KV cache.
    model.set_kv_cache(batch_size=3, max_seq_length=32)
    with torch.no_grad():
        steps = [model(idx[:, :6], input_pos=torch.arange(6))]
        steps += [model(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(6, 14)]
    torch.testing.assert_close(torch.cat(steps, dim=1), logits, atol=ATOL, rtol=0)

    export_hf(tmp_path / "ours", tmp_path / "back")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert reloaded.config.model_type == hf_model.config.model_type
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, expected, atol=ATOL, rtol=0)
