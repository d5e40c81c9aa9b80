"""GGUF both ways: a file written the way llama.cpp's converter writes one imports with the
original's logits and tokenization (and those of transformers' own GGUF loader); `to_gguf`
writes every exported family as llama.cpp's converter would (read back with gguf's reader),
and imports back with equal logits; the chat template and Ollama Modelfile of a prompt style."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
import yaml
from hf_models import make_hf_model

from benchmarks.gguf_check import CHAT_TEMPLATE, TINY_FAMILIES, tiny_checkpoint, tiny_tokenizer
from lifecycle_cli import cli
from lifecycle_cli.checkpoint import load_config, load_model
from lifecycle_cli.commands.convert import from_gguf, to_gguf, to_hf
from lifecycle_cli.prompts import ChatTemplate, get_style, save_prompt_style
from lifecycle_cli.tokenizer import Tokenizer
from lifecycle_cli.zoo.templates import GO, JINJA, SAMPLES

VOCAB = 300
TEXTS = [
    "Hello, world!", "def f(x):\n    return x * 2  # 1234", "  naïve café — 🙂", "a<|im_end|>b",
]  # fmt: skip
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), VOCAB)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama (transformers) with the tokenizer, as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("llama")
    model = make_hf_model("llama", folder, vocab_size=VOCAB)
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, folder / path.name)
    return folder, model


def write_like_llama_cpp(hf_dir: Path, out: Path, qtype=Q.F32) -> Path:
    """What llama.cpp's convert_hf_to_gguf.py writes for a Llama folder, by the gguf package
    alone: its name table, the q/k row permutation, 2-D weights in `qtype`, the tokenizer."""
    hf = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tok_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    n_head, n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    w = gguf.GGUFWriter(out, "llama")
    w.add_name("tiny")
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_block_count(hf["num_hidden_layers"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base((hf.get("rope_parameters") or hf)["rope_theta"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_dimension_count(hf["hidden_size"] // n_head)
    w.add_file_type(0)
    vocab = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {t["id"]: t for t in tok["added_tokens"]}
    tokens = [added[i]["content"] if i in added else vocab.get(i, f"[PAD{i}]") for i in
              range(VOCAB)]  # fmt: skip
    types = [3 if i in added else (1 if i in vocab else 5) for i in range(VOCAB)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(tokens.index(tok_config["bos_token"]))
    w.add_eos_token_id(tokens.index(tok_config["eos_token"]))
    w.add_add_bos_token(False)
    w.add_chat_template(tok_config["chat_template"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hf["num_hidden_layers"])
    from safetensors.torch import load_file

    for name, t in load_file(hf_dir / "model.safetensors").items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = n_head if "q_proj" in name else n_kv
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(t.shape)
        data = t.float().numpy()
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if data.ndim == 2 and qtype != Q.F32:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    return getattr(out, "logits", out)


IDX = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def test_a_llama_cpp_gguf_imports_with_the_original_logits_and_tokenizer(llama, tmp_path):
    hf_dir, hf_model = llama
    path = write_like_llama_cpp(hf_dir, tmp_path / "tiny.gguf")
    from_gguf(path, tmp_path / "imported")

    ckpt = tmp_path / "imported"
    ours = logits(load_model(ckpt), IDX)
    torch.testing.assert_close(ours, logits(hf_model, IDX), atol=1e-5, rtol=0)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    torch.testing.assert_close(ours, logits(reference, IDX), atol=1e-5, rtol=0)

    ours, original = Tokenizer(ckpt), Tokenizer(hf_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert ours.encode(text) == original.encode(text) == hf_tok(text)["input_ids"], text
    assert (ours.bos_id, ours.eos_id) == (original.bos_id, original.eos_id)
    assert ours.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1])
def test_quantized_gguf_weights_import_as_gguf_dequantizes_them(qtype, llama, tmp_path):
    hf_dir, hf_model = llama
    path = write_like_llama_cpp(hf_dir, tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    code = cli.main(["download", "org/tiny", "--from_gguf", str(path), "--checkpoint_dir",
                     str(tmp_path / "checkpoints")])  # fmt: skip
    assert code == 0
    ours = load_model(tmp_path / "checkpoints" / "org" / "tiny")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    torch.testing.assert_close(logits(ours, IDX), logits(reference, IDX), atol=1e-4, rtol=0)
    original = logits(hf_model, IDX)
    error = (logits(ours, IDX) - original).abs().max() / original.abs().max()
    assert error > 0 and (qtype != Q.Q8_0 or error < 0.1)  # quantized; 8 bits stay close


def test_an_unsupported_gguf_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    w = gguf.GGUFWriter(tmp_path / "bert.gguf", "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tmp_path / "notes.gguf").write_text("not a gguf")
    for name, message in (("bert.gguf", "architecture 'bert' is not supported"),
                          ("notes.gguf", "is not a valid GGUF file"),
                          ("missing.gguf", "does not exist")):  # fmt: skip
        code = cli.main(["convert", "from_gguf", str(tmp_path / name), "--out_dir",
                         str(tmp_path / "out")])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    download_args = ["--from_gguf", str(tmp_path / "bert.gguf"), "--checkpoint_dir", str(tmp_path)]
    assert cli.main(["download", *download_args]) == 2


# --------------------------------------------------------------------------------------------
# Export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (checkpoint folder, its weights exported to a Hugging Face folder)."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = tiny_tokenizer(root / "tokenizer")
    out = {}
    for family in TINY_FAMILIES:
        ckpt = tiny_checkpoint(family, root / family, tokenizer)
        to_hf(ckpt, root / f"{family}-hf")
        out[family] = (ckpt, root / f"{family}-hf")
    return out


ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
        "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "mixtral": "llama",
        "qwen3_moe": "qwen3moe", "gpt2": "gpt2",
        "gpt_neox": "gptneox", "phi3": "phi3", "olmo2": "olmo2", "smollm3": "smollm3"}  # fmt: skip


def expected_gguf_tensors(family: str, hf_dir: Path) -> dict[str, np.ndarray]:
    """What llama.cpp's converter makes of the Hugging Face weights: gguf's names, Llama's q/k
    rows permuted, Gemma's norms + 1, GPT-2's Conv1D weights transposed, GPT-NeoX's per-head
    q|k|v rows regrouped as q, k, v, Llama 3's rope factors."""
    from safetensors.numpy import load_file

    hf = json.loads((hf_dir / "config.json").read_text())
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == ARCH[family])
    names = gguf.get_tensor_name_map(arch, hf.get("num_hidden_layers") or hf["n_layer"])
    out, experts = {}, {}
    for name, t in load_file(hf_dir / "model.safetensors").items():
        t = t.astype(np.float32)
        if ARCH[family] in ("llama", "smollm3") and ("q_proj" in name or "k_proj" in name):
            heads = hf["num_attention_heads"] if "q_proj" in name else hf["num_key_value_heads"]
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(t.shape)
        if family.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1
        if family == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            t = t.T
        if family == "gpt_neox" and "query_key_value" in name:
            heads = hf["num_attention_heads"]
            t = t.reshape(heads, 3, -1, *t.shape[1:]).swapaxes(0, 1).reshape(t.shape)
        expert = re.search(r"\.experts\.(\d+)\.", name)
        if expert:  # llama.cpp stacks a layer's experts in one tensor
            merged = names.get_name(name.replace(expert.group(0), ".experts."), (".weight",))
            experts.setdefault(merged, {})[int(expert.group(1))] = t
            continue
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = t
    for merged, parts in experts.items():
        out[merged] = np.stack([parts[e] for e in range(len(parts))])
    if family == "llama":
        out["rope_freqs.weight"] = None  # checked through the round trip's logits
    return out


def metadata(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_to_gguf_writes_what_llama_cpp_reads_and_imports_back_equal(family, tiny, tmp_path):
    ckpt, hf_dir = tiny[family]
    expected = expected_gguf_tensors(family, hf_dir)
    config = load_config(ckpt)
    # Quantization error bounds: half a step of 1/127 (q8_0), up to 1/8 (q4_0: no +8 code).
    for dtype, qtype, bound in (("f32", Q.F32, 0.0), ("q8_0", Q.Q8_0, 1 / 200),
                                ("q4_0", Q.Q4_0, 1 / 7)):  # fmt: skip
        path = tmp_path / f"{family}-{dtype}.gguf"
        to_gguf(ckpt, path, dtype=dtype)
        reader = gguf.GGUFReader(path)
        assert sorted(t.name for t in reader.tensors) == sorted(expected)
        for t in reader.tensors:
            want = expected[t.name]
            if want is None:
                continue
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
            f32 = want.ndim == 1 or t.name.endswith(("ffn_gate_inp.weight", "position_embd.weight"))
            assert t.tensor_type == (Q.F32 if f32 else qtype), t.name
            assert np.abs(got - want).max() <= bound * np.abs(want).max(), (dtype, t.name)
        meta, arch = metadata(reader), ARCH[family]
        assert meta["general.architecture"] == arch
        assert meta[f"{arch}.block_count"] == config.n_layer
        assert meta[f"{arch}.embedding_length"] == config.n_embd
        assert meta[f"{arch}.feed_forward_length"] == config.intermediate_size
        assert meta[f"{arch}.attention.head_count"] == config.n_head
        assert meta[f"{arch}.attention.head_count_kv"] == config.n_query_groups
        assert meta[f"{arch}.attention.key_length"] == config.head_size
        if config.position_embedding == "rope":
            assert meta[f"{arch}.rope.freq_base"] == pytest.approx(config.rope_base)
            assert meta[f"{arch}.rope.dimension_count"] == config.rope_n_elem
        else:
            assert not any(key.startswith(f"{arch}.rope.") for key in meta)
        eps = "layer_norm_epsilon" if config.norm == "layernorm" else "layer_norm_rms_epsilon"
        assert meta[f"{arch}.attention.{eps}"] == pytest.approx(config.norm_eps)
        if arch == "gptneox":
            assert meta[f"{arch}.use_parallel_residual"] == config.parallel_residual
        assert meta[f"{arch}.context_length"] == config.block_size
        if config.sliding_window:
            assert meta[f"{arch}.attention.sliding_window"] == config.sliding_window
            assert meta[f"{arch}.attention.sliding_window_pattern"] == (
                config.sliding_window_pattern
            )
        for key in ("attention_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, key) is not None:
                gguf_key = key.replace("attention_logit", "attn_logit")
                assert meta[f"{arch}.{gguf_key}"] == pytest.approx(getattr(config, key))
        tokenizer = Tokenizer(ckpt)
        assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
        assert meta["tokenizer.ggml.tokens"] == [tokenizer.id_to_token(i) for i in range(VOCAB)]
        assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
        assert meta["tokenizer.ggml.token_type"][tokenizer.eos_id] == 3  # control
        assert meta["tokenizer.chat_template"] == tokenizer.chat_template

    from_gguf(tmp_path / f"{family}-f32.gguf", tmp_path / "back")
    imported_as = "llama" if family == "mistral" else config.hf_model_type  # as llama.cpp runs it
    assert load_config(tmp_path / "back").hf_model_type == imported_as
    idx = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        logits(load_model(tmp_path / "back"), idx), logits(load_model(ckpt), idx), atol=1e-5,
        rtol=0,
    )  # fmt: skip
    for text in TEXTS:
        assert Tokenizer(tmp_path / "back").encode(text) == Tokenizer(ckpt).encode(text)


def test_families_llama_cpp_cannot_run_are_refused_before_writing(tiny, tmp_path, capsys):
    gpt_oss = tmp_path / "gpt_oss"
    shutil.copytree(tiny["llama"][0], gpt_oss)
    config = load_config(gpt_oss).to_dict()
    config.update(hf_model_type="gpt_oss")
    (gpt_oss / "model_config.yaml").write_text(yaml.safe_dump(config))
    neox_gqa = tiny_checkpoint("llama", tmp_path / "neox", tiny["llama"][0])
    config = load_config(neox_gqa).to_dict()
    config.update(hf_model_type="gpt_neox", norm="layernorm", mlp="gelu", bias=True, attn_bias=True)
    (neox_gqa / "model_config.yaml").write_text(yaml.safe_dump(config))
    smollm3 = tmp_path / "smollm3"
    shutil.copytree(tiny["smollm3"][0], smollm3)
    config = load_config(smollm3).to_dict()
    config.update(nope_layers=[1])
    (smollm3 / "model_config.yaml").write_text(yaml.safe_dump(config))
    gemma2 = tmp_path / "gemma2"
    shutil.copytree(tiny["gemma2"][0], gemma2)
    config = load_config(gemma2).to_dict()
    config.update(attention_scale=12**-0.5)
    (gemma2 / "model_config.yaml").write_text(yaml.safe_dump(config))
    for ckpt, message in ((gpt_oss, "the gpt_oss family cannot be written as GGUF"),
                          (neox_gqa, "gptneox cannot run grouped-query attention"),
                          (smollm3, "other than every 4th"),
                          (gemma2, "cannot run attention_scale other than")):  # fmt: skip
        code = cli.main(["convert", "to_gguf", str(ckpt), "--out_file", str(tmp_path / "x.gguf")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert list(tmp_path.glob("*x.gguf*")) == []


@pytest.mark.parametrize("style", list(JINJA))
def test_the_chat_template_written_for_a_prompt_style_renders_as_the_style(style, tiny):
    tokenizer = Tokenizer(tiny["llama"][0])
    builtin, written = get_style(style, tokenizer), ChatTemplate(JINJA[style], tokenizer)
    conversations = [
        *SAMPLES,
        [{"role": "system", "content": " Sys "}, {"role": "user", "content": " a "},
         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        [{"role": "system", "content": ""}, {"role": "user", "content": "x"}],
    ]  # fmt: skip
    for messages in conversations:
        for gen in (True, False):
            assert written.render(messages, gen) == builtin.render(messages, gen), messages


def test_ollama_modelfile_carries_the_prompt_style_stops_and_sampling(tiny, tmp_path):
    ckpt = tmp_path / "chatml"
    shutil.copytree(tiny["qwen2"][0], ckpt)
    save_prompt_style("chatml", ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))
    code = cli.main(["convert", "to_gguf", str(ckpt), "--out_file", str(tmp_path / "o" /
                     "model.gguf"), "--dtype", "q8_0", "--ollama", "true"])  # fmt: skip
    assert code == 0
    text = (tmp_path / "o" / "Modelfile").read_text()
    lines = text.splitlines()
    assert "FROM ./model.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert "PARAMETER temperature 0.6" in lines and "PARAMETER top_p 0.9" in lines
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == GO["chatml"]
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in template
    # The GGUF's own chat template is that style's, as llama.cpp will render it.
    meta = metadata(gguf.GGUFReader(tmp_path / "o" / "model.gguf"))
    assert meta["tokenizer.chat_template"] == JINJA["chatml"]
