"""GGUF both ways: a file written the way llama.cpp's converter writes one imports with the
original's logits and tokenization (and those of transformers' own GGUF loader)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from hf_models import make_hf_model

from lifecycle_cli import cli
from lifecycle_cli.checkpoint import load_model
from lifecycle_cli.commands.convert import from_gguf
from lifecycle_cli.tokenizer import Tokenizer, train_bpe

VOCAB = 300
TEXTS = [
    "Hello, world!", "def f(x):\n    return x * 2  # 1234", "  naïve café — 🙂", "a<|im_end|>b",
]  # fmt: skip
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    out = tmp_path_factory.mktemp("tokenizer")
    special = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    train_bpe(None, VOCAB, out, texts=list(topics.values())[:50], special_tokens=special)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


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


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
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
