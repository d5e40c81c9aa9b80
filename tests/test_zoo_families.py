"""The current-generation families (OLMo 2, SmolLM3, Gemma 3, Qwen3-MoE, GPT-OSS): our GPT gives
transformers' logits on tiny random configs of several shapes, with and without the KV cache,
and after a round trip back to Hugging Face format; their named configs have the published
sizes; the router losses match transformers'; a tiny model of each finetunes with LoRA, serves and
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


# Parameter counts of the published checkpoints (embeddings included, tied ones once). The
# Gemma 3 4b/12b/27b entries are their text decoders (Gemma3ForCausalLM), without the vision
# tower the multimodal repos add.
PUBLISHED = {
    "OLMo-2-0425-1B": 1_484_916_736,
    "OLMo-2-1124-7B": 7_298_617_344,
    "OLMo-2-1124-13B": 13_716_198_400,
    "SmolLM3-3B": 3_075_098_624,
    "gemma-3-270m": 268_098_176,
    "gemma-3-1b": 999_885_952,
    "gemma-3-4b": 3_880_263_168,
    "gemma-3-12b": 11_766_034_176,
    "gemma-3-27b": 27_009_346_304,
    "Qwen3-30B-A3B": 30_532_122_624,
    "gpt-oss-20b": 20_914_757_184,
    "gpt-oss-120b": 116_829_156_672,
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_named_config_has_the_published_parameter_count(name):
    from lifecycle_cli.model import GPT
    from lifecycle_cli.zoo import named_config

    with torch.device("meta"):
        model = GPT(named_config(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


def test_download_list_shows_the_new_families_and_sizes(capsys):
    from lifecycle_cli.commands.download import download

    download("list")
    out = capsys.readouterr().out
    for model_type in ("olmo2", "smollm3", "gemma3_text", "qwen3_moe", "gpt_oss"):
        assert model_type in out
    for name in PUBLISHED:
        assert f"  {name}\n" in out


@pytest.mark.parametrize("variant", ["qwen3_moe", "gpt_oss"])
def test_router_loss_is_transformers_aux_loss_times_its_coefficient(variant, tmp_path):
    from lifecycle_cli.mlp import expert_load, router_loss

    hf_model = make_hf_model(variant, tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ours")
    model = load_model(tmp_path / "ours").train()
    idx = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    expected = hf_model(idx, output_router_logits=True).aux_loss
    model(idx)
    loss = router_loss(model)
    coef = hf_model.config.router_aux_loss_coef
    torch.testing.assert_close(loss, coef * expected, atol=1e-6, rtol=1e-5)
    loss.backward()  # the router learns from it
    assert model.blocks[0].mlp.gate.weight.grad.abs().sum() > 0
    used, busiest = expert_load(model)
    assert 0 < used <= 1 and busiest >= 1


FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0,
                    -4.0, -6.0])  # fmt: skip


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) -> blocks (rows, cols/32, 16) uint8 and scales (rows, cols/32) uint8, as
    the published GPT-OSS checkpoints store them (low nibble first, exponent biased by 127)."""
    groups = w.reshape(*w.shape[:-1], -1, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0))
    scaled = groups / torch.exp2(exponent)[..., None]
    codes = (scaled[..., None] - FP4).abs().argmin(-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def test_gpt_oss_mxfp4_experts_are_dequantized_while_converting(tmp_path):
    """A checkpoint with MXFP4 experts (as published) converts to the logits transformers gives
    with the experts transformers itself dequantizes from those blocks and scales."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf_model = make_hf_model("gpt_oss", tmp_path / "hf")
    state = load_file(tmp_path / "hf/model.safetensors")
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = quantize_mxfp4(state.pop(name).transpose(1, 2).contiguous())
        state[f"{name}_blocks"], state[f"{name}_scales"] = blocks, scales
        dequantized = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        hf_model.get_parameter(name).data.copy_(dequantized)
    save_file(state, tmp_path / "hf/model.safetensors", metadata={"format": "pt"})
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ours", dtype="float32")
    model = load_model(tmp_path / "ours")
    idx = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, atol=ATOL, rtol=0)


TINY = dict(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, head_size=8, intermediate_size=64,
            block_size=64)  # fmt: skip
TINY_MOE = dict(n_expert=4, n_expert_per_token=2, expert_intermediate_size=32)
TINY_FAMILIES = {
    "OLMo-2-0425-1B": {},
    "SmolLM3-3B": {"nope_layers": [1]},
    "gemma-3-270m": {"sliding_window": 4, "attention_scale": 8**-0.5},
    "Qwen3-30B-A3B": {**TINY_MOE, "router_aux_loss_coef": 0.1, "router_z_loss_coef": 0.01},
    "gpt-oss-20b": {**TINY_MOE, "sliding_window": 4},
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from pydoc_data.topics import topics

    from lifecycle_cli.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("tok")
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    train_bpe(None, 300, folder, texts=list(topics.values())[:200], special_tokens=specials)
    (folder / "chat_template.jinja").write_text(CHATML)
    return folder


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_lora_finetune_then_generate_chat_and_serve(name, tokenizer_dir, tmp_path):
    from served import Server

    from lifecycle_cli import LLM
    from lifecycle_cli.checkpoint import save_checkpoint
    from lifecycle_cli.commands.chat import ChatSession
    from lifecycle_cli.commands.finetune import finetune
    from lifecycle_cli.data.args import InstructData
    from lifecycle_cli.generate import SamplingParams
    from lifecycle_cli.lora import LoRAArgs
    from lifecycle_cli.model import GPT
    from lifecycle_cli.prompts import get_style, resolve_style
    from lifecycle_cli.tokenizer import Tokenizer
    from lifecycle_cli.train.args import EvalArgs, TrainArgs
    from lifecycle_cli.train.logs import read_metrics
    from lifecycle_cli.zoo import named_config

    vocab = Tokenizer(tokenizer_dir).vocab_size
    config = named_config(name, **TINY, vocab_size=vocab, **TINY_FAMILIES[name])
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", GPT(config), tokenizer_dir=tokenizer_dir)
    finetune(
        tmp_path / "base", out_dir=tmp_path / "out", method="lora",
        data=InstructData(synthetic="reverse", synthetic_train_size=32, synthetic_val_size=4),
        lora=LoRAArgs(r=4, alpha=8, mlp=True), prompt_style="plain",
        train=TrainArgs(global_batch_size=4, micro_batch_size=4, max_steps=2, lr=1e-2,
                        warmup_steps=1, log_interval=1),
        eval=EvalArgs(interval=100, max_iters=1), exact_match_samples=2, max_new_tokens=3,
    )  # fmt: skip
    rows = [r for r in read_metrics(tmp_path / "out/metrics.csv") if r["train_loss"]]
    assert len(rows) == 2
    if config.mlp == "moe":  # the router losses were added and logged, with the expert load
        assert all(float(r["router_loss"]) > 0 and float(r["experts_used"]) > 0 for r in rows)
    llm = LLM.load(tmp_path / "out/final")
    text = llm.generate("abc", max_new_tokens=5, temperature=0)
    assert isinstance(text, str) and llm.generate("abc", max_new_tokens=5, temperature=0) == text
    # chat: the tokenizer's own Jinja template renders the conversation
    style = get_style("chat_template", llm.tokenizer)
    session = ChatSession(llm.generator(), llm.tokenizer, style, SamplingParams(max_new_tokens=3))
    session.reply("hi")
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    # serve: an OpenAI chat completion, greedy, equal to the Python API's answer to the same turn
    server = Server(tmp_path / "out/final", tmp_path / "serve.log")
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                "temperature": 0}  # fmt: skip
        status, reply, _ = server.call("/v1/chat/completions", body)
        assert status == 200, reply
        # the style serve formats chats with: the one the checkpoint was finetuned with
        served_style = resolve_style(tmp_path / "out/final", llm.tokenizer, "auto")
        greedy = ChatSession(llm.generator(), llm.tokenizer, served_style,
                             SamplingParams(max_new_tokens=3, temperature=0))  # fmt: skip
        greedy.reply("hi")
        assert reply["choices"][0]["message"]["content"] == greedy.history[1]["content"]
    finally:
        server.stop()


def test_multimodal_gemma3_checkpoint_converts_its_text_decoder(tmp_path):
    """The gemma-3-4b/12b/27b repos (model_type gemma3): a text_config naming only some keys
    (transformers' defaults fill the rest), tensors under language_model.*, a vision tower that
    is left out."""
    import json

    from safetensors.torch import load_file, save_file

    hf_model = make_hf_model("gemma3", tmp_path / "text")
    text = json.loads((tmp_path / "text/config.json").read_text())
    defaults = ("vocab_size", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")
    text_config = {k: v for k, v in text.items() if k not in defaults and k != "model_type"}
    state = {
        f"language_model.{n}": t for n, t in load_file(tmp_path / "text/model.safetensors").items()
    }
    state["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)
    state["multi_modal_projector.mm_input_projection_weight"] = torch.zeros(4, 32)
    (tmp_path / "mm").mkdir()
    save_file(state, tmp_path / "mm/model.safetensors", metadata={"format": "pt"})
    (tmp_path / "mm/config.json").write_text(json.dumps({
        "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {**text_config, "model_type": "gemma3_text", "vocab_size": 96},
        "vision_config": {"model_type": "siglip_vision_model"},
    }))  # fmt: skip
    config = convert_hf_checkpoint(tmp_path / "mm", tmp_path / "ours")
    assert config.hf_model_type == "gemma3_text" and config.tie_embeddings
    idx = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ours")(idx), hf_model(idx).logits,
                                   atol=ATOL, rtol=0)  # fmt: skip
