"""Tokenizer over the Hugging Face `tokenizers` library, and training a byte-level BPE.

A tokenizer lives in a checkpoint folder laid out the Hugging Face way: `tokenizer.json` (the whole
pipeline), `tokenizer_config.json` (special tokens, chat template, class name for `transformers`),
optionally `special_tokens_map.json`, `chat_template.jinja` and `generation_config.json`.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lifecycle_cli.errors import UserError

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
SENTENCEPIECE_FILE = "tokenizer.model"


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as written in a config: a plain string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # legacy multi-template form: [{"name", "template"}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class Tokenizer:
    """Text <-> token ids for the checkpoint in `checkpoint_dir`.

    `bos_id`/`eos_id`/`pad_id` are the ids of the configured special tokens (None when there is
    none); `eos_ids` are every id that ends generation (eos plus generation_config.json's list);
    `vocab_size` counts added tokens; `chat_template` is the Jinja template, if any.
    """

    def __init__(self, checkpoint_dir: Path | str) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        d = self.checkpoint_dir
        if not d.is_dir():
            raise UserError(f"tokenizer folder {d} does not exist")
        tokenizer_file = d / "tokenizer.json"
        if not tokenizer_file.is_file():
            if (d / SENTENCEPIECE_FILE).is_file():
                raise UserError(
                    f"{d} has only a sentencepiece {SENTENCEPIECE_FILE} and no tokenizer.json; "
                    "write one with `AutoTokenizer.from_pretrained(dir).save_pretrained(dir)` "
                    "(transformers with sentencepiece installed)"
                )
            raise UserError(f"no tokenizer.json in {d}")
        try:
            self._tok = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise UserError(f"cannot read {tokenizer_file}: {e}") from None
        # Kept in memory so that `save` still works once the source folder is gone (pruned
        # checkpoints); these files are small.
        self._files = {n: (d / n).read_bytes() for n in TOKENIZER_FILES if (d / n).is_file()}

        config = _read_json(d / "tokenizer_config.json")
        # Like transformers: special_tokens_map.json is legacy and only consulted when the config
        # does not already describe its added tokens.
        if "added_tokens_decoder" not in config:
            config.update(_read_json(d / "special_tokens_map.json"))
        generation = _read_json(d / "generation_config.json")

        self._mark_special(config)
        self.bos_id = self._special_id(config.get("bos_token"))
        self.eos_id = self._special_id(config.get("eos_token"))
        self.pad_id = self._special_id(config.get("pad_token"))
        gen_eos = generation.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if self.bos_id is None and isinstance(generation.get("bos_token_id"), int):
            self.bos_id = generation["bos_token_id"]
        if self.eos_id is None and gen_eos:
            self.eos_id = gen_eos[0]
        self.eos_ids = list(dict.fromkeys([i for i in [self.eos_id, *gen_eos] if i is not None]))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

        self.chat_template = _chat_template(config)
        jinja = d / "chat_template.jinja"
        if jinja.is_file():  # transformers 5 writes the template here; it wins over the config
            self.chat_template = jinja.read_text(encoding="utf-8")

    def _special_id(self, value: Any) -> int | None:
        content = _token_content(value)
        return None if content is None else self._tok.token_to_id(content)

    def _mark_special(self, config: dict[str, Any]) -> None:
        # transformers registers the configured special tokens as added tokens, so a token that
        # sits in the model vocab but is not yet "added" stops being split out of text there;
        # doing the same keeps our ids equal to AutoTokenizer's.
        names = [config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        names += list(extra.values() if isinstance(extra, dict) else extra)
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        for content in map(_token_content, names):
            if content and content not in added and self._tok.token_to_id(content) is not None:
                self._tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Token ids of `text`.

        bos=None does what the tokenizer's own post-processor does (the ids transformers gives);
        bos=True makes sure the sequence starts with bos, bos=False drops a bos the post-processor
        added; eos=True makes sure it ends with eos.
        """
        enc = self._tok.encode(text)
        ids, added = list(enc.ids), list(enc.special_tokens_mask)
        if bos is False and ids and added[0] and ids[0] == self.bos_id:
            ids = ids[1:]
        elif bos and not (ids and ids[0] == self.bos_id):
            ids = [self._require(self.bos_id, "bos"), *ids]
        if eos and not (ids and ids[-1] == self.eos_id):
            ids.append(self._require(self.eos_id, "eos"))
        return ids

    def _require(self, token_id: int | None, name: str) -> int:
        if token_id is None:
            raise UserError(f"the tokenizer in {self.checkpoint_dir} has no {name} token")
        return token_id

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of `ids`: any iterable of ints, or a tensor/array (anything with `.tolist()`)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def save(self, out_dir: Path | str) -> list[str]:
        """Write the tokenizer files this tokenizer was loaded from into `out_dir`; their names."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, content in self._files.items():
            (out / name).write_bytes(content)
        return list(self._files)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.checkpoint_dir)!r}, vocab_size={self.vocab_size})"


def copy_tokenizer_files(src_dir: Path | str, dst_dir: Path | str) -> list[str]:
    """Copy whichever tokenizer files exist in `src_dir` into `dst_dir`; the names copied."""
    src, dst = Path(src_dir), Path(dst_dir)
    names = [n for n in (*TOKENIZER_FILES, SENTENCEPIECE_FILE) if (src / n).is_file()]
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (dst / name).resolve() != (src / name).resolve():
            shutil.copyfile(src / name, dst / name)
    return names


def _read_texts(files: Iterable[Path]) -> Iterator[str]:
    for path in files:
        try:
            yield Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"training file {path} is not UTF-8 text") from None
        except OSError as e:
            raise UserError(f"cannot read training file {path}: {e.strerror or e}") from None


def train_bpe(
    files: Iterable[Path] | None,
    vocab_size: int,
    out_dir: Path,
    *,
    texts: Iterable[str] | None = None,
    special_tokens: Iterable[str] = ("<|endoftext|>",),
    model_max_length: int = 2048,
) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens included) on the text of
    `files` and/or `texts`, write it to `out_dir` and load it.

    Like GPT-2: any byte can be encoded (no unknown tokens), and the first special token is bos,
    eos and unk, but encoding adds none of them. `model_max_length` is the context length
    recorded for transformers.
    """
    special = list(special_tokens)
    if not special:
        raise UserError("train_bpe needs at least one special token (the end-of-text token)")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special):
        raise UserError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{len(alphabet) + len(special)} (256 bytes + special tokens)"
        )
    seen_text = False

    def corpus() -> Iterator[str]:
        nonlocal seen_text
        for text in itertools.chain(_read_texts(files or []), texts or []):
            seen_text = seen_text or bool(text.strip())
            yield text

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    if not seen_text:
        raise UserError("cannot train a tokenizer on an empty corpus: the training text is empty")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special[0],
        "eos_token": special[0],
        "unk_token": special[0],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    return Tokenizer(out)
