"""Tokenizer: load Hugging Face folders, train a byte-level BPE, agree with transformers."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from lifecycle_cli.errors import UserError
from lifecycle_cli.tokenizer import TOKENIZER_FILES, Tokenizer, copy_tokenizer_files, train_bpe

CORPUS = list(topics.values())
SAMPLES = [
    "Hello, world!",
    "  leading spaces, trailing spaces  ",
    "line one\nline two\r\n\ttabbed",
    "café naïve résumé — “quotes”",
    "中文字符和日本語のテキスト",
    "emoji 😀🚀👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n    return x ** 2  # comment",
    "null\x00byte and bell\x07",
    "",
]


def random_text(seed: int, n: int = 200) -> str:
    rng = random.Random(seed)
    chars = [chr(rng.randrange(0x110000)) for _ in range(n)]
    return "".join(c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF)  # no lone surrogates


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe(None, 1024, out, texts=CORPUS)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-style folder: the post-processor prepends <s>, bos given as an AddedToken dict."""
    out = tmp_path_factory.mktemp("llama")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tok.save(str(out / "tokenizer.json"))
    bos = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": bos | {"rstrip": False, "single_word": False},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_trained_bpe_round_trips_any_text(gpt2_dir: Path) -> None:
    tok = Tokenizer(gpt2_dir)
    assert tok.vocab_size == 1024
    assert tok.checkpoint_dir == gpt2_dir
    for text in [*SAMPLES, random_text(0), random_text(1)]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # the tokenizer actually compresses English: fewer tokens than bytes
    text = CORPUS[0][:2000]
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_trained_bpe_special_tokens_are_endoftext_like_gpt2(gpt2_dir: Path) -> None:
    tok = Tokenizer(gpt2_dir)
    eot = tok.token_to_id("<|endoftext|>")
    assert eot is not None
    assert tok.bos_id == tok.eos_id == eot
    assert tok.eos_ids == [eot]
    assert tok.id_to_token(eot) == "<|endoftext|>"
    assert tok.encode("hi")[0] != eot  # the post-processor adds nothing, as GPT-2
    assert tok.encode("hi", bos=True) == [eot, *tok.encode("hi")]
    assert tok.encode("hi", eos=True) == [*tok.encode("hi"), eot]
    # the literal text of a special token becomes that token, and can be skipped when decoding
    ids = tok.encode("a<|endoftext|>b")
    assert eot in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_trained_bpe_matches_transformers(gpt2_dir: Path) -> None:
    tok = Tokenizer(gpt2_dir)
    hf = AutoTokenizer.from_pretrained(gpt2_dir)
    for text in [*SAMPLES, random_text(2), "hello , world . don't", "x<|endoftext|>y"]:
        ids = hf(text)["input_ids"]
        assert tok.encode(text) == ids
        assert tok.decode(ids) == hf.decode(ids) == text
    assert hf.eos_token_id == tok.eos_id and hf.bos_token_id == tok.bos_id
    assert len(hf) == tok.vocab_size


def test_train_from_files(tmp_path: Path) -> None:
    files = []
    for i, chunk in enumerate([CORPUS[: len(CORPUS) // 2], CORPUS[len(CORPUS) // 2 :]]):
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_text("\n".join(chunk), encoding="utf-8")
    tok = train_bpe(files, 512, tmp_path / "tok")
    assert tok.vocab_size == 512
    assert tok.decode(tok.encode("Files work too: ünïcödé")) == "Files work too: ünïcödé"
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_llama_style_bos_follows_post_processor(llama_dir: Path) -> None:
    tok = Tokenizer(llama_dir)
    hf = AutoTokenizer.from_pretrained(llama_dir)
    s, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (s, eos, [eos])
    for text in ["Hello world", "héllo 中文 😀", ""]:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"]
        assert ids[0] == s
        assert tok.encode(text, bos=False) == ids[1:]
        assert tok.encode(text, bos=True) == ids
        assert tok.encode(text, eos=True) == [*ids, eos]
        assert tok.encode(text, bos=False, eos=True) == [*ids[1:], eos]
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok.encode("hi")) == "<s>hi"


def test_decode_accepts_tensor_like_and_single_ids(gpt2_dir: Path) -> None:
    class TensorLike:  # what torch tensors and numpy arrays offer
        def __init__(self, values: list[int] | int) -> None:
            self.values = values

        def tolist(self) -> list[int] | int:
            return self.values

    tok = Tokenizer(gpt2_dir)
    ids = tok.encode("tensor text")
    assert tok.decode(TensorLike(ids)) == "tensor text"
    assert tok.decode(iter(ids)) == "tensor text"
    assert tok.decode(TensorLike(ids[0])) == tok.decode(ids[:1])


def test_chat_template_from_jinja_file_written_by_transformers(gpt2_dir: Path, tmp_path: Path):
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    hf = AutoTokenizer.from_pretrained(gpt2_dir)
    hf.chat_template = template
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == template
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    tok = Tokenizer(tmp_path)
    assert tok.chat_template == template
    assert tok.encode("round trip é") == hf("round trip é")["input_ids"]


def test_chat_template_from_tokenizer_config(gpt2_dir: Path, tmp_path: Path) -> None:
    shutil.copy(gpt2_dir / "tokenizer.json", tmp_path)
    config = json.loads((gpt2_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": "A"}))
    assert Tokenizer(tmp_path).chat_template == "A"
    (tmp_path / "chat_template.jinja").write_text("B")
    assert Tokenizer(tmp_path).chat_template == "B"  # the .jinja file wins
    assert Tokenizer(gpt2_dir).chat_template is None


def test_generation_config_extends_eos_ids(llama_dir: Path, tmp_path: Path) -> None:
    copy_tokenizer_files(llama_dir, tmp_path)
    base = Tokenizer(tmp_path)
    unk = base.token_to_id("<unk>")
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [unk, base.eos_id]})
    )
    tok = Tokenizer(tmp_path)
    assert tok.eos_id == base.eos_id
    assert tok.eos_ids == [base.eos_id, unk]  # eos first, no duplicates


def test_special_tokens_map_and_added_token_dicts(gpt2_dir: Path, tmp_path: Path) -> None:
    shutil.copy(gpt2_dir / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    assert Tokenizer(tmp_path).eos_id is None
    special = {"eos_token": {"content": "<|endoftext|>", "normalized": False}, "pad_token": "!"}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    tok = Tokenizer(tmp_path)
    assert tok.eos_id == tok.token_to_id("<|endoftext|>")
    assert tok.pad_id == tok.token_to_id("!") is not None
    assert tok.bos_id is None
    with pytest.raises(UserError, match="no bos token"):
        tok.encode("x", bos=True)


def test_configured_special_token_in_vocab_is_never_split(gpt2_dir: Path, tmp_path: Path):
    # a token the model knows but tokenizer.json does not list as added: transformers makes it a
    # special token once the config names it, so its literal text must become that one id
    shutil.copy(gpt2_dir / "tokenizer.json", tmp_path)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "Ġthe"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok, hf = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    the = tok.token_to_id("Ġthe")
    assert the is not None and tok.eos_id == the
    text = "in the end Ġthe x"
    assert tok.encode(text) == hf(text)["input_ids"]
    assert tok.encode(text).count(the) == 2
    assert Tokenizer(gpt2_dir).encode(text).count(the) == 1


def test_save_and_copy_give_folders_both_libraries_load(llama_dir: Path, tmp_path: Path) -> None:
    (llama_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    try:
        tok = Tokenizer(llama_dir)
        saved = tok.save(tmp_path / "saved")
        copied = copy_tokenizer_files(llama_dir, tmp_path / "copied")
    finally:
        (llama_dir / "chat_template.jinja").unlink()
    expected = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    assert saved == copied == expected
    assert set(expected) <= set(TOKENIZER_FILES)
    for folder in (tmp_path / "saved", tmp_path / "copied"):
        again, hf = Tokenizer(folder), AutoTokenizer.from_pretrained(folder)
        assert again.chat_template == tok.chat_template == "{{ messages[0]['content'] }}"
        for text in SAMPLES:
            assert again.encode(text) == tok.encode(text) == hf(text)["input_ids"]


def test_save_works_after_the_source_folder_is_gone(gpt2_dir: Path, tmp_path: Path) -> None:
    copy_tokenizer_files(gpt2_dir, tmp_path / "step-000100")
    tok = Tokenizer(tmp_path / "step-000100")
    tok.save(tmp_path / "step-000100")  # onto itself
    shutil.rmtree(tmp_path / "step-000100")  # an old checkpoint pruned during training
    tok.save(tmp_path / "step-000200")
    assert Tokenizer(tmp_path / "step-000200").encode("pruned") == tok.encode("pruned")


def test_copy_tokenizer_files_takes_sentencepiece_model_too(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.model").write_bytes(b"\x00spm")
    (tmp_path / "src" / "model.safetensors").write_bytes(b"weights")
    assert copy_tokenizer_files(tmp_path / "src", tmp_path / "dst") == ["tokenizer.model"]
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["tokenizer.model"]


def test_missing_tokenizer_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer(tmp_path / "nowhere")
    with pytest.raises(UserError, match=f"no tokenizer.json in {tmp_path}"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00spm")
    with pytest.raises(UserError, match="sentencepiece tokenizer.model and no tokenizer.json"):
        Tokenizer(tmp_path)


def test_malformed_files_are_user_errors(gpt2_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer(tmp_path)
    shutil.copy(gpt2_dir / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(UserError, match="tokenizer_config.json"):
        Tokenizer(tmp_path)


def test_training_input_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(UserError, match="missing.txt"):
        train_bpe([missing], 512, tmp_path / "out")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\xff\xfe\x00\x80" * 10)
    with pytest.raises(UserError, match="weights.bin is not UTF-8"):
        train_bpe([binary], 512, tmp_path / "out")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty corpus"):
        train_bpe([tmp_path / "empty.txt"], 512, tmp_path / "out", texts=[""])
    with pytest.raises(UserError, match="empty corpus"):
        train_bpe(None, 512, tmp_path / "out")
    with pytest.raises(UserError, match="too small"):
        train_bpe(None, 100, tmp_path / "out", texts=CORPUS)
    assert not (tmp_path / "out").exists()  # nothing written when training fails


def test_import_does_not_load_torch() -> None:
    code = "import sys, lifecycle_cli.tokenizer; assert 'torch' not in sys.modules"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)
