"""Instruction and classification data: records -> checked examples -> masked, padded batches."""

import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch

from lifecycle_cli.data.classify import (
    ClassificationDataset,
    make_separable_examples,
    read_classification,
)
from lifecycle_cli.data.instruct import (
    InstructData,
    SFTDataset,
    detect_format,
    load_examples,
)
from lifecycle_cli.errors import UserError
from lifecycle_cli.prompts import ALPACA_INPUT_SYSTEM, ALPACA_SYSTEM, get_style
from lifecycle_cli.tokenizer import Tokenizer, train_bpe

TEXTS = [topics[k] for k in sorted(topics)][:40]
EOT = "<|endoftext|>"

ALPACA = {"instruction": "Name the keyword.", "input": "for x in y", "output": "The for loop."}
ALPACA_NO_INPUT = {"instruction": "Say yes.", "output": "yes"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A sequence."},
        {"role": "user", "content": "And a tuple?"},
        {"role": "assistant", "content": "An immutable sequence."},
    ]
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_bpe(None, 512, tmp_path_factory.mktemp("tok"), texts=TEXTS)


@pytest.fixture(scope="module")
def pad_tok(tmp_path_factory) -> Tokenizer:
    """A tokenizer with a pad token of its own (the default one pads with eos)."""
    out = tmp_path_factory.mktemp("padtok")
    train_bpe(None, 400, out, texts=TEXTS, special_tokens=(EOT, "<pad>"))
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<pad>"}))
    return Tokenizer(out)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# The prompt and the trained reply of each case, written out by hand from the formats.
CASES = {
    "alpaca-style alpaca record": (
        "alpaca",
        ALPACA,
        f"{ALPACA_INPUT_SYSTEM}\n\n### Instruction:\nName the keyword.\n\n### Input:\n"
        "for x in y\n\n### Response:\n",
        "The for loop.",
    ),
    "chatml chat record": (
        "chatml",
        CHAT,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is a list?<|im_end|>\n"
        "<|im_start|>assistant\nA sequence.<|im_end|>\n<|im_start|>user\nAnd a tuple?<|im_end|>\n"
        "<|im_start|>assistant\n",
        "An immutable sequence.<|im_end|>\n",
    ),
    "chatml alpaca record (input joined)": (
        "chatml",
        ALPACA,
        "<|im_start|>user\nName the keyword.\n\nfor x in y<|im_end|>\n<|im_start|>assistant\n",
        "The for loop.<|im_end|>\n",
    ),
    "alpaca-style chat record": (
        "alpaca",
        {"messages": CHAT["messages"][1:3]},
        f"{ALPACA_SYSTEM}\n\n### Instruction:\nWhat is a list?\n\n### Response:\n",
        "A sequence.",
    ),
    "plain alpaca record": ("plain", ALPACA_NO_INPUT, "Say yes.", "\n yes"),
}


@pytest.mark.parametrize("mask_prompt", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_labels_are_masked_exactly_on_the_prompt(tok, case, mask_prompt):
    style_name, record, prompt_text, reply_text = CASES[case]
    ds = SFTDataset([record], tok, get_style(style_name, tok), 512, mask_prompt, seed=None)
    prompt, reply = tok.encode(prompt_text), tok.encode(reply_text) + [tok.eos_id]
    ids = prompt + reply
    batch = ds.get([0])
    assert batch["input_ids"].tolist() == [ids[:-1]]
    labels = batch["labels"][0].tolist()
    if mask_prompt:
        # The last prompt position predicts the reply's first token; nothing before it counts.
        assert labels == [-100] * (len(prompt) - 1) + reply
        assert tok.decode([t for t in labels if t != -100]) == reply_text + EOT
    else:
        assert labels == ids[1:]
    assert ds.eval_items() == [(prompt, record.get("output") or chat_answer(record))]
    assert ds.n_truncated == 0


def test_plain_replies_spell_words_as_their_prompt_does(tok):
    """A reply repeating a prompt's words gets the prompt's tokens for them, its first word too
    (after the newline it would otherwise be spelt without its leading space)."""
    record = {"instruction": "flip: cat dog", "output": "dog cat"}
    ds = SFTDataset([record], tok, get_style("plain", tok), 512, seed=None)
    ids = ds.ids(0).tolist()
    n_prompt = len(tok.encode("flip: cat dog"))
    reply = ids[n_prompt:-1]  # the eos dropped
    newline = tok.encode("\n", bos=False)
    assert reply[: len(newline)] == newline
    words = {w: tok.encode(" " + w, bos=False) for w in ("cat", "dog")}
    assert reply[len(newline) :] == words["dog"] + words["cat"]
    assert ids[n_prompt - len(words["cat"]) - len(words["dog"]) : n_prompt] == (
        words["cat"] + words["dog"]
    )


def chat_answer(record) -> str:
    return record["messages"][-1]["content"]


def test_batches_are_right_padded_and_count_tokens(tok, pad_tok):
    records = [ALPACA_NO_INPUT, ALPACA, {"instruction": "x", "output": "a much longer answer " * 5}]
    for tokenizer, pad in ((tok, tok.eos_id), (pad_tok, pad_tok.token_to_id("<pad>"))):
        ds = SFTDataset(records, tokenizer, get_style("alpaca", tokenizer), 512, seed=None)
        assert ds.pad_id == pad
        lengths = [len(ds.ids(i)) for i in range(3)]
        batch = ds.get([0, 1, 2])
        width = max(lengths) - 1
        assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
        for b, n in enumerate(lengths):
            assert batch["input_ids"][b, : n - 1].tolist() == ds.ids(b)[:-1].tolist()
            assert (batch["input_ids"][b, n - 1 :] == pad).all()
            assert (batch["labels"][b, n - 1 :] == -100).all()
            assert batch["labels"][b, n - 2] == tokenizer.eos_id  # the reply ends with eos
        assert batch["n_tokens"].shape == () and batch["n_tokens"].dtype == torch.long
        assert int(batch["n_tokens"]) == sum(n - 1 for n in lengths)
        one = ds.get([1])  # a batch is as wide as its own longest row
        assert one["input_ids"].shape == (1, lengths[1] - 1)


def numbered(n: int) -> list[dict]:
    return [{"instruction": f"item {i}", "output": "ok " * (i % 3 + 1)} for i in range(n)]


def rows(batch) -> list[tuple[int, ...]]:
    """Each row without its padding (mask_prompt=False: labels are -100 only on padding)."""
    return [tuple(x[y != -100].tolist()) for x, y in zip(batch["input_ids"], batch["labels"])]


def test_global_indices_follow_a_seeded_permutation_per_epoch(tok):
    n = 7
    style = get_style("plain", tok)
    ds = SFTDataset(numbered(n), tok, style, 64, mask_prompt=False, seed=3)
    epochs = [ds.example_ids(range(e * n, (e + 1) * n)).tolist() for e in range(4)]
    for order in epochs:
        assert sorted(order) == list(range(n))  # every example once per epoch
    assert len({tuple(o) for o in epochs}) > 1  # and a new order per epoch
    again = SFTDataset(numbered(n), tok, style, 64, mask_prompt=False, seed=3)
    assert again.example_ids(range(4 * n)).tolist() == sum(epochs, [])
    other = SFTDataset(numbered(n), tok, style, 64, mask_prompt=False, seed=4)
    assert other.example_ids(range(4 * n)).tolist() != sum(epochs, [])
    # Batch rows are the examples those indices name, across an epoch boundary too.
    batch = ds.get(range(5, 10))
    assert rows(batch) == [tuple(ds.ids(i)[:-1].tolist()) for i in epochs[0][5:] + epochs[1][:3]]

    # Two ranks reading their halves of each global batch see what one reader sees.
    global_batch, micro = 4, 2
    for step in range(5):
        first = step * global_batch
        alone = rows(ds.get(range(first, first + global_batch)))
        ranks = [rows(ds.get(range(first + r * micro, first + (r + 1) * micro))) for r in (0, 1)]
        assert ranks[0] + ranks[1] == alone

    in_order = SFTDataset(numbered(n), tok, style, 64, mask_prompt=False, seed=None)
    assert in_order.example_ids(range(2 * n)).tolist() == list(range(n)) * 2
    with pytest.raises(IndexError):
        in_order.get([-1])


def test_truncation_keeps_the_reply_and_counts(tok):
    style = get_style("plain", tok)
    long_prompt = {"instruction": " ".join(f"word{i}" for i in range(60)), "output": "short"}
    long_reply = {"instruction": "go", "output": " ".join(f"w{i}" for i in range(80))}
    fits = {"instruction": "go", "output": "fine"}
    budget = 24  # max_seq_length 23: the model reads 23 tokens, 24 ids with the last label
    ds = SFTDataset([long_prompt, long_reply, fits], tok, style, budget - 1, seed=None)
    assert ds.n_truncated == 2 and ds.n_reply_truncated == 1
    full_prompt = tok.encode(long_prompt["instruction"])
    reply = tok.encode("\n short") + [tok.eos_id]
    kept = ds.ids(0).tolist()
    assert len(kept) == budget and kept[-len(reply) :] == reply  # the reply whole, eos kept
    assert kept[: -len(reply)] == full_prompt[-(budget - len(reply)) :]  # the prompt's end
    assert ds.eval_items()[0][0] == kept[: -len(reply)]

    kept = ds.ids(1).tolist()
    assert len(kept) == budget and kept[0] == tok.encode("go")[0]  # the whole (short) prompt
    assert kept[-1] != tok.eos_id  # the reply lost its end: counted in n_reply_truncated
    assert ds.ids(2).tolist() == tok.encode("go") + tok.encode("\n fine") + [tok.eos_id]
    assert ds.get([0, 1, 2])["input_ids"].shape == (3, budget - 1)


# ---------------------------------------------------------------------------------------------
# Reading files


def test_load_alpaca_chat_json_and_jsonl(tmp_path):
    records = [*numbered(20), CHAT]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    train, val = load_examples(InstructData(path=path, val_fraction=0.25, seed=1))
    assert len(val) == 5 and len(train) == 16

    def key(record):
        return json.dumps(record, sort_keys=True)

    expected = [{**r, "input": ""} if "instruction" in r else r for r in records]
    assert sorted(map(key, train + val)) == sorted(map(key, expected))
    again = load_examples(InstructData(path=path, val_fraction=0.25, seed=1))
    assert again == (train, val)
    assert load_examples(InstructData(path=path, val_fraction=0.25, seed=2))[1] != val

    as_list = tmp_path / "data.json"
    as_list.write_text(json.dumps(records, indent=2))
    assert load_examples(InstructData(path=as_list, val_fraction=0.25, seed=1)) == (train, val)

    val_file = write_jsonl(tmp_path / "val.jsonl", [ALPACA])
    assert load_examples(InstructData(path=path, val_path=val_file)) == (
        load_examples(InstructData(path=as_list, val_path=val_file))
    )
    train, val = load_examples(InstructData(path=path, val_path=val_file))
    assert len(train) == 21 and val == [ALPACA]
    assert detect_format(InstructData(path=path)) == "alpaca"
    assert detect_format(InstructData(path=write_jsonl(tmp_path / "c.jsonl", [CHAT]))) == "chat"


def msg(role, content="hi"):
    return {"role": role, "content": content}


BAD_RECORDS = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"instruction": "a"}), "missing field 'output'"),
    (json.dumps({"instruction": " ", "output": "b"}), "field 'instruction' is empty"),
    (json.dumps({"instruction": "a", "output": 5}), "'output' should be a string, found int"),
    (json.dumps({"instruction": "a", "input": ["x"], "output": "b"}), "'input' should be a str"),
    (json.dumps({"prompt": "a", "completion": "b"}), "neither an Alpaca record"),
    (json.dumps({"messages": "hi"}), "'messages' should be a list"),
    (json.dumps({"messages": []}), "found an empty list"),
    (json.dumps({"messages": [msg("user"), msg("bot")]}), "message 2: unknown role 'bot'"),
    (json.dumps({"messages": [msg("assistant"), msg("user")]}), "last message should be the"),
    (json.dumps({"messages": [msg("user"), msg("system"), msg("assistant")]}), "only come first"),
    (json.dumps({"messages": [msg("user"), {"role": "assistant"}]}), "'content' should be a str"),
    (json.dumps({"messages": [msg("user"), msg("assistant", " ")]}), "content is empty"),
]


@pytest.mark.parametrize("line, why", BAD_RECORDS, ids=[w for _, w in BAD_RECORDS])
def test_a_malformed_jsonl_record_is_named_by_file_and_line(tmp_path, line, why):
    path = tmp_path / "data.jsonl"
    good = json.dumps(ALPACA_NO_INPUT)
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_examples(InstructData(path=path))
    assert f"{path}:4: " in str(e.value) and why in str(e.value)


def test_a_malformed_json_list_record_is_named_by_line_and_index(tmp_path):
    path = tmp_path / "data.json"
    records = [ALPACA, ALPACA, {"instruction": "a", "output": ""}]
    path.write_text(json.dumps(records, indent=2))
    starts = [i for i, s in enumerate(path.read_text().splitlines(), 1) if s == "  {"]
    line = starts[2]  # where the third record starts
    with pytest.raises(UserError, match=rf"data.json:{line}: record 3: field 'output' is empty"):
        load_examples(InstructData(path=path))
    path.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": \n]')
    with pytest.raises(UserError, match=r"data.json:4: record 2: not valid JSON"):
        load_examples(InstructData(path=path))
    path.write_text(json.dumps({"instruction": "a", "output": "b"}))
    with pytest.raises(UserError, match="expected a JSON list of records, found an object"):
        load_examples(InstructData(path=path))


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.jsonl", "\n \n"), ("e.json", "[]")])
def test_an_empty_file_is_refused(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=f"{path} holds no records"):
        load_examples(InstructData(path=path))


def test_bad_options_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", numbered(5))
    with pytest.raises(UserError, match="unknown data format 'xml'"):
        load_examples(InstructData(path=path, format="xml"))
    with pytest.raises(UserError, match="give --data.path FILE or --data.synthetic"):
        load_examples(InstructData())
    with pytest.raises(UserError, match="either --data.path or --data.synthetic"):
        load_examples(InstructData(path=path, synthetic="reverse"))
    with pytest.raises(UserError, match="unsupported file type '.txt'"):
        load_examples(InstructData(path=tmp_path / "d.txt"))
    with pytest.raises(UserError, match="does not exist"):
        load_examples(InstructData(path=tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="val_fraction must be between 0 and 1"):
        load_examples(InstructData(path=path, val_fraction=0.0))
    with pytest.raises(UserError, match=r"d.jsonl:1: missing field 'messages'"):
        load_examples(InstructData(path=path, format="chat"))
    (tmp_path / "bin.jsonl").write_bytes(b'{"instruction": "a", "output": "b"}\n\xff\xfe\n')
    with pytest.raises(UserError, match=r"bin.jsonl:2: not UTF-8"):
        load_examples(InstructData(path=tmp_path / "bin.jsonl"))


def test_synthetic_data_through_load_examples():
    from lifecycle_cli.data.synthetic import make_examples

    data = InstructData(synthetic="reverse,add", synthetic_train_size=30, synthetic_val_size=4)
    assert detect_format(data) == "alpaca"
    assert load_examples(data) == make_examples(["reverse", "add"], 30, 4, 42)


# ---------------------------------------------------------------------------------------------
# Classification


def test_read_csv_tsv_and_jsonl(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('id,text,label\n1,"Hello, world",ham\n2,"two\nlines",spam\n\n3,x,ham\n')
    assert read_classification(csv_path) == [
        ("Hello, world", "ham"),
        ("two\nlines", "spam"),
        ("x", "ham"),
    ]
    tsv_path = tmp_path / "d.tsv"
    tsv_path.write_text('label\ttext\npos\tsaid "great", twice\nneg\tbad\n')
    assert read_classification(tsv_path) == [('said "great", twice', "pos"), ("bad", "neg")]
    jsonl_path = write_jsonl(
        tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "x"}]
    )
    assert read_classification(jsonl_path) == [("a", "1"), ("b", "x")]

    assert detect_format(InstructData(path=csv_path)) == "classification"
    assert detect_format(InstructData(path=jsonl_path)) == "classification"
    train, val = load_examples(InstructData(path=csv_path, val_fraction=0.34, seed=0))
    assert len(train) == 2 and len(val) == 1
    assert all(set(r) == {"text", "label"} for r in train + val)


BAD_ROWS = [
    ("d.csv", 'text,label\na,b\n"two\nlines",c\nonly one field\n', 5, "expected 2 fields"),
    ("d.csv", "text,label\na,b\nc,\n", 3, "the label is empty"),
    ("d.csv", "label,text\nx, \n", 2, "the text is empty"),
    ("d.csv", "words,class\na,b\n", 1, "header must name the columns text and label"),
    ("d.tsv", "text\tlabel\na\tb\n\tc\n", 3, "the text is empty"),
    ("d.jsonl", '{"text": "a", "label": "b"}\n{"text": "a"}\n', 2, "missing field 'label'"),
    ("d.jsonl", '{"text": "a", "label": "b"}\n{"text": "a", "label": 1.5}\n', 2, "'label' should"),
]


@pytest.mark.parametrize("name, content, line, why", BAD_ROWS, ids=[r[3] for r in BAD_ROWS])
def test_a_bad_classification_row_is_named_by_file_and_line(tmp_path, name, content, line, why):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError) as e:
        read_classification(path)
    assert f"{path}:{line}: " in str(e.value) and why in str(e.value)


def test_an_empty_classification_file_is_refused(tmp_path):
    for name, content in (("e.csv", ""), ("h.csv", "text,label\n"), ("e.jsonl", "")):
        (tmp_path / name).write_text(content)
        with pytest.raises(UserError, match="holds no examples"):
            read_classification(tmp_path / name)
    with pytest.raises(UserError, match="unsupported file type '.xml'"):
        read_classification(tmp_path / "d.xml")


def test_classification_batches(tok):
    examples = [
        ("Spam spam spam, win cash now!", "spam"),
        ("See you at lunch", "ham"),
        ("ok", "ham"),
    ]
    ds = ClassificationDataset(examples, tok, max_seq_length=64, seed=None)
    assert ds.labels == ["ham", "spam"] and ds.class_counts() == {"ham": 2, "spam": 1}
    batch = ds.get([0, 1, 2])
    ids = [tok.encode(t) for t, _ in examples]
    width = max(map(len, ids))
    assert batch["input_ids"].shape == (3, width)
    assert batch["last_index"].tolist() == [len(x) - 1 for x in ids]
    assert batch["labels"].tolist() == [1, 0, 0]
    assert int(batch["n_tokens"]) == sum(map(len, ids))
    for b, x in enumerate(ids):
        assert batch["input_ids"][b, : len(x)].tolist() == x
        assert (batch["input_ids"][b, len(x) :] == ds.pad_id).all()
        assert batch["input_ids"][b, batch["last_index"][b]] == x[-1]

    short = ClassificationDataset(examples, tok, ["ham", "spam"], max_seq_length=3, seed=None)
    assert short.n_truncated == 2 and short.get([0])["input_ids"][0].tolist() == ids[0][:3]
    with pytest.raises(UserError, match="label 'eggs' is not among the training labels"):
        ClassificationDataset([("x", "eggs")], tok, ds.labels)
    shuffled = ClassificationDataset(examples * 2, tok, max_seq_length=64, seed=0)
    order = shuffled.get(range(6))["labels"].tolist()
    assert sorted(order) == [0, 0, 0, 0, 1, 1]


def test_separable_examples_are_balanced_and_separable():
    examples = make_separable_examples(101, seed=5)
    labels = [label for _, label in examples]
    assert labels.count("spam") == 51 and labels.count("ham") == 50
    assert make_separable_examples(101, seed=5) == examples
    assert make_separable_examples(101, seed=6) != examples
    assert labels[:10] != sorted(labels[:10]) or labels[10:20] != sorted(labels[10:20])

    def words(label):
        return {w.strip(".!?").lower() for t, lb in examples if lb == label for w in t.split()}

    spam_only, ham_only = words("spam") - words("ham"), words("ham") - words("spam")
    for text, label in examples:  # each text carries words only its own class uses
        own = spam_only if label == "spam" else ham_only
        assert {w.strip(".!?").lower() for w in text.split()} & own
