"""Named configurations mirror published models; config.json is read by model_type."""

from __future__ import annotations

import pytest
import torch

from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError
from lifecycle_cli.model import GPT
from lifecycle_cli.zoo import named_config
from lifecycle_cli.zoo.convert import config_from_hf

# Parameter counts of the published checkpoints (embeddings included, tied ones once).
PUBLISHED = {
    "gpt2": 124_439_808,
    "pythia-14m": 14_067_712,
    "pythia-160m": 162_322_944,
    "Llama-2-7b-hf": 6_738_415_616,
    "Llama-3.2-1B": 1_235_814_400,
    "SmolLM2-135M": 134_515_008,
    "Mistral-7B-v0.1": 7_241_732_096,
    "Mixtral-8x7B-v0.1": 46_702_792_704,
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen3-0.6B": 596_049_920,
    "gemma-2-2b": 2_614_341_888,
    "Phi-3-mini-4k-instruct": 3_821_079_552,
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_named_config_has_the_published_parameter_count(name):
    with torch.device("meta"):
        model = GPT(named_config(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


def test_named_configs_are_found_with_org_and_any_case():
    assert named_config("meta-llama/llama-3.2-1b").name == "Llama-3.2-1B"


def test_unknown_name_suggests_close_ones():
    with pytest.raises(UserError, match="did you mean.*pythia-14m"):
        named_config("pythia-14")


def test_unsupported_model_type_lists_the_supported_ones():
    with pytest.raises(UserError, match=r"'bert' is not supported \(supported: gpt2, .*phi3"):
        config_from_hf({"model_type": "bert"})


def test_transformers_4_and_5_rope_keys_give_the_same_config():
    base = dict(
        model_type="llama", vocab_size=64, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )  # fmt: skip
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)  # fmt: skip
    v4 = config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **scaling}})
    v5 = config_from_hf(
        {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}}
    )
    assert v4 == v5
    assert v4.rope_base == 5e5 and v4.rope_scaling["type"] == "llama3"


def test_unsupported_rope_scaling_is_refused():
    with pytest.raises(UserError, match="rope scaling 'dynamic' is not supported"):
        config_from_hf({
            "model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "silu",
            "rope_scaling": {"type": "dynamic", "factor": 4.0},
        })  # fmt: skip


def test_config_yaml_round_trip_and_unknown_field(tmp_path):
    config = named_config("gemma-2-2b")
    config.save(tmp_path / "model_config.yaml")
    assert Config.from_file(tmp_path / "model_config.yaml") == config
    (tmp_path / "bad.yaml").write_text("n_layer: 2\nn_layers: 3\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown model config field\(s\) n_layers"):
        Config.from_file(tmp_path / "bad.yaml")


def test_inconsistent_heads_are_refused():
    with pytest.raises(UserError, match="n_head=6 is not a multiple of n_query_groups=4"):
        Config(n_embd=48, n_head=6, n_query_groups=4)
