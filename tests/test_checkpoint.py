"""Checkpoint folders: written atomically, sharded when large, loadable by LLM.load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from hf_models import make_hf_model

from lifecycle_cli import LLM
from lifecycle_cli.checkpoint import (
    INDEX_FILE,
    ShardWriter,
    load_model,
    save_checkpoint,
    weight_files,
)
from lifecycle_cli.errors import UserError
from lifecycle_cli.model import GPT
from lifecycle_cli.tokenizer import train_bpe
from lifecycle_cli.zoo import named_config
from lifecycle_cli.zoo.convert import convert_hf_checkpoint


def tiny(name: str = "gpt2", **overrides) -> GPT:
    torch.manual_seed(0)
    fields = dict(
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_query_groups=2,
        vocab_size=64,
        block_size=32,
        intermediate_size=64,
    )
    return GPT(named_config(name, **{**fields, **overrides}))


@pytest.mark.parametrize("name", ["gpt2", "SmolLM2-135M", "Mixtral-8x7B-v0.1"])
def test_save_then_load_gives_the_same_logits(name, tmp_path):
    model = tiny(name, **({"n_expert": 4} if name.startswith("Mixtral") else {}))
    save_checkpoint(tmp_path / "ckpt", model)
    loaded = load_model(tmp_path / "ckpt")
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), atol=0, rtol=0)
    assert loaded.config == model.config
    if model.config.tie_embeddings:  # still one tensor: training the loaded model keeps the tie
        assert loaded.lm_head.weight is loaded.wte.weight


def test_large_models_are_sharded_with_an_index(tmp_path):
    model = tiny("SmolLM2-135M")
    save_checkpoint(tmp_path / "ckpt", model, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "ckpt" / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not list((tmp_path / "ckpt").glob(".shard-*"))
    idx = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ckpt")(idx), model(idx))


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    first = tiny()
    save_checkpoint(tmp_path / "ckpt", first)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    def crash(self, name, tensor):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ShardWriter, "add", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt", tiny(n_layer=3))
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial folder left


def test_llm_load_gives_model_and_tokenizer(tmp_path):
    hf = make_hf_model("llama", tmp_path / "hf", vocab_size=300)
    from pydoc_data.topics import topics

    train_bpe(None, 300, tmp_path / "hf", texts=list(topics.values())[:50])
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt")

    llm = LLM.load(tmp_path / "ckpt")
    ids = llm.tokenizer.encode("def f(x): return x")
    assert llm.tokenizer.decode(ids) == "def f(x): return x"
    idx = torch.tensor([ids])
    with torch.no_grad():
        logits = llm.model(idx)
        assert logits.shape == (1, len(ids), 300) and logits.dtype == torch.float32
        torch.testing.assert_close(logits, hf(idx).logits, atol=1e-4, rtol=0)


def test_multi_shard_hf_folder_converts_into_shards(tmp_path):
    hf = make_hf_model("qwen2", tmp_path / "hf", max_shard_size="60KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt", max_shard_bytes=40_000)
    assert (tmp_path / "ckpt" / INDEX_FILE).is_file()
    idx = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(tmp_path / "ckpt")(idx), hf(idx).logits, atol=1e-4, rtol=0
        )


def stored_dtypes(folder) -> set[str]:
    """The dtypes of the tensors as the safetensors files hold them (read by safetensors)."""
    from safetensors import safe_open

    dtypes = set()
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            dtypes |= {f.get_slice(name).get_dtype() for name in f.keys()}
    return dtypes


def test_dtype_option_stores_that_precision_and_none_keeps_the_source_s(tmp_path):
    hf = make_hf_model("phi3", tmp_path / "hf32")
    hf.half().save_pretrained(tmp_path / "hf16")  # a float16 source: float32 is not the default
    cases = {"bfloat16": "BF16", "float32": "F32", None: "F16"}
    for dtype, stored in cases.items():
        convert_hf_checkpoint(tmp_path / "hf16", tmp_path / f"ckpt-{dtype}", dtype=dtype)
        assert stored_dtypes(tmp_path / f"ckpt-{dtype}") == {stored}, dtype
    # The values are the source's, cast: loading in float32 gives the float16 weights exactly.
    model = load_model(tmp_path / "ckpt-None")
    torch.testing.assert_close(
        model.wte.weight, hf.model.embed_tokens.weight.float(), atol=0, rtol=0
    )
    assert model.wte.weight.dtype == torch.float32


def test_folders_that_are_not_checkpoints_are_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        LLM.load(tmp_path / "nope")
    make_hf_model("gpt2", tmp_path / "hf")
    with pytest.raises(UserError, match="looks like a Hugging Face folder.*--from_dir"):
        LLM.load(tmp_path / "hf")


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "lifecycle_cli", *args], cwd=cwd, capture_output=True, text=True
    )


def test_download_from_dir_then_convert_to_hf_from_the_command_line(tmp_path):
    hf = make_hf_model("gemma2", tmp_path / "hf")
    proc = run_cli("download", "google/tiny-gemma", "--from_dir", "hf", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ckpt = tmp_path / "checkpoints" / "google" / "tiny-gemma"
    assert (ckpt / "model_config.yaml").is_file()

    proc = run_cli("convert", "to_hf", str(ckpt), "--out_dir", "exported", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    idx = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, hf(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["../escape", "--from_dir", "hf"], "repo id '../escape' is not of the form org/name"),
        (["org/m", "--from_dir", "missing"], "missing has no config.json"),
        (["org/m", "--from_dir", "bert"], "model_type 'bert' is not supported (supported: gpt2"),
        (
            ["org/m", "--from_dir", "hf", "--dtype", "int3"],
            "--dtype: expected one of float32, float16, bfloat16 or null, got 'int3'",
        ),
    ],
)
def test_download_from_dir_errors_are_one_line_and_write_nothing(args, message, tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    proc = run_cli("download", *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").rglob("*"))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A checkpoint with a tokenizer, and copies whose model.safetensors is cut in half or whose
    header is not JSON."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("damaged")
    make_hf_model("llama", root / "hf", vocab_size=300)
    train_bpe(None, 300, root / "hf", texts=list(topics.values())[:50])
    convert_hf_checkpoint(root / "hf", root / "good")
    data = (root / "good" / "model.safetensors").read_bytes()
    for name, damage in (("truncated", data[: len(data) // 2]), ("garbled", data[:8] + b"{" * 64)):
        shutil.copytree(root / "good", root / name)
        (root / name / "model.safetensors").write_bytes(damage)
    return root


@pytest.mark.parametrize("kind", ["truncated", "garbled"])
def test_a_damaged_weights_file_is_a_user_error_naming_it(kind, damaged):
    with pytest.raises(UserError, match=rf"{kind}/model\.safetensors cannot be read"):
        load_model(damaged / kind)


@pytest.mark.parametrize(
    "kind, args",
    [
        ("truncated", ["generate", "truncated", "--prompt", "hi", "--max_new_tokens", "2"]),
        ("garbled", ["generate", "garbled", "--prompt", "hi"]),
        ("truncated", ["finetune", "truncated", "--data.synthetic", "reverse", "--out_dir", "ft"]),
        ("truncated", ["convert", "to_hf", "truncated", "--out_dir", "exported"]),
        ("garbled", ["convert", "to_hf", "garbled", "--out_dir", "exported"]),
    ],
)
def test_verbs_that_load_damaged_weights_say_so_in_one_line(kind, args, damaged, tmp_path):
    for name in ("truncated", "garbled"):
        (tmp_path / name).symlink_to(damaged / name)
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.split("\r")[-1]  # after the progress bar's erasures, if any
    assert last.startswith(f"error: {kind}/model.safetensors "), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbled", "truncated"]  # no output
