"""`llmcycle download` against a fake Hugging Face Hub on 127.0.0.1 (the real huggingface_hub
client), its one-line errors, resuming an interrupted download, and the round trip
HF folder -> `download --from_dir` -> `convert to_hf` -> transformers for every family."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from fake_hub import FakeHub, closed_port_url
from hf_models import FAMILIES, make_hf_model

from lifecycle_cli.checkpoint import load_model
from lifecycle_cli.commands.convert import to_hf
from lifecycle_cli.commands.download import download
from lifecycle_cli.errors import UserError
from lifecycle_cli.tokenizer import Tokenizer, train_bpe
from lifecycle_cli.zoo.convert import read_safetensors
from lifecycle_cli.zoo.hub import cached_snapshot, fetch, needed_files

VOCAB = 300
TOKEN = "hf_test_token"
ATOL = 1e-4
TEXTS = [
    "Hello, world!",
    "def f(x):\n    return x * 2  # doubled",
    "  naïve café — 🙂",
    "a<|endoftext|>b",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Files a Hub repo may hold that a checkpoint does not need: they must not be downloaded.
DECOYS = {
    "README.md": b"# tiny\n",
    "pytorch_model.bin": b"not a pickle",
    "consolidated.safetensors": b"not safetensors",
    "original/params.json": b"{}",
}


@pytest.fixture(autouse=True)
def only_localhost(monkeypatch):
    """This process connects to 127.0.0.1 and nowhere else; huggingface_hub sends no telemetry."""
    import huggingface_hub.constants

    connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in (
            "127.0.0.1",
            "::1",
        ):
            raise AssertionError(f"a test tried to reach {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE, with a chat template where transformers 5 writes it."""
    from pydoc_data.topics import topics

    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe(None, VOCAB, out, texts=list(topics.values())[:50])
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


def hf_folder(family: str, out: Path, tokenizer_dir: Path, **save_kwargs):
    """A random-init transformers model of `family` in `out`, with the tokenizer files."""
    model = make_hf_model(family, out, vocab_size=VOCAB, **save_kwargs)
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, out / path.name)
    return model


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tokenizer_dir):
    """A fake Hub serving org/tiny (a sharded Llama plus decoy files; its tag v2 another Llama),
    the same model gated as org/gated, and org/bert (a model_type we do not support)."""
    root = tmp_path_factory.mktemp("hub")
    model = hf_folder("llama", root / "tiny", tokenizer_dir, max_shard_size="60KB")
    for name, data in DECOYS.items():
        (root / "tiny" / name).parent.mkdir(exist_ok=True)
        (root / "tiny" / name).write_bytes(data)
    (root / "bert").mkdir()
    (root / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (root / "bert" / "model.safetensors").write_bytes(b"weights that must not be fetched")
    with FakeHub() as fake:
        fake.add_repo("org/tiny", root / "tiny")
        fake.add_repo("org/gated", root / "tiny", token=TOKEN)
        fake.add_repo("org/bert", root / "bert")
        # A tag holding other weights (another seed), in one file: what --revision v2 must get.
        fake.v2_model = hf_folder("llama", root / "tiny-v2", tokenizer_dir, seed=1)
        fake.v2_sha = fake.add_repo("org/tiny", root / "tiny-v2", revision="v2")
        fake.model = model
        fake.shards = sorted(p.name for p in (root / "tiny").glob("model-*.safetensors"))
        yield fake


def llmcycle(*args: str, cwd: Path, endpoint: str, **env: str) -> subprocess.CompletedProcess:
    """`llmcycle ARGS` in a fresh process whose huggingface_hub talks to `endpoint` and caches
    under cwd/hf_home."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    clean.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(cwd / "hf_home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1",
        no_proxy="127.0.0.1",
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "lifecycle_cli", *args],
        cwd=cwd,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_logits_equal(checkpoint: Path, hf_model) -> None:
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_model(checkpoint)(idx)
        torch.testing.assert_close(ours, hf_model(idx).logits, atol=ATOL, rtol=0)


def nothing_under(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def fetched(hub: FakeHub, repo: str) -> set[str]:
    """The files of `repo` the fake hub sent (GET), by path in the repo."""
    return {
        r.path.split("/resolve/", 1)[1].split("/", 1)[1]
        for r in hub.gets()
        if r.path.startswith(f"/{repo}/")
    }


def test_download_from_the_hub_gives_transformers_logits(hub, tmp_path):
    hub.requests.clear()
    proc = llmcycle("download", "org/tiny", cwd=tmp_path, endpoint=hub.url)
    assert proc.returncode == 0, proc.stderr
    ckpt = tmp_path / "checkpoints" / "org" / "tiny"
    assert_logits_equal(ckpt, hub.model)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (ckpt / name).is_file(), name
    assert (ckpt / "generation_config.json").is_file()
    assert Tokenizer(ckpt).chat_template == CHAT_TEMPLATE
    # Only what a checkpoint needs came over the wire, and it went to huggingface_hub's cache.
    assert fetched(hub, "org/tiny") == {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "model.safetensors.index.json", *hub.shards,
    }  # fmt: skip
    assert list((tmp_path / "hf_home" / "hub").glob("models--org--tiny/snapshots/*/config.json"))
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "org").iterdir()) == ["tiny"]
    assert "Converting tiny" in proc.stderr  # the conversion's progress bar
    assert f"into {Path('checkpoints') / 'org' / 'tiny'}" in proc.stdout


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["org/missing"], {}, "repo org/missing not found on http://127.0.0.1:"),
        (["org/gated"], {}, "org/gated is gated: accept its terms on its Hub page, then pass "
         "--access_token TOKEN or set HF_TOKEN"),
        (["org/gated", "--access_token", "wrong"], {"HF_TOKEN": TOKEN}, "org/gated is gated"),
        (["org/tiny", "--revision", "v9"], {}, "revision 'v9' not found in org/tiny"),
        (["org/bert"], {}, "model_type 'bert' is not supported (supported: gpt2, gpt_neox, llama"),
        (["org/../../etc"], {}, "repo id 'org/../../etc' is not of the form org/name"),
        (["/abs/path"], {}, "repo id '/abs/path' is not of the form org/name"),
    ],
)  # fmt: skip
def test_hub_errors_are_one_line_exit_2_and_write_nothing(hub, tmp_path, args, env, message):
    hub.requests.clear()
    proc = llmcycle("download", *args, cwd=tmp_path, endpoint=hub.url, **env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    assert nothing_under(tmp_path / "checkpoints")
    if "--access_token" in args:  # the flag wins over $HF_TOKEN
        sent = {r.headers.get("authorization") for r in hub.requests if "/org/gated" in r.path}
        assert sent == {"Bearer wrong"}
    if args == ["org/bert"]:  # refused from config.json alone, before any weights
        assert fetched(hub, "org/bert") == {"config.json"}


def test_unreachable_hub_is_one_line_naming_from_dir(tmp_path):
    proc = llmcycle("download", "org/tiny", cwd=tmp_path, endpoint=closed_port_url())
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: cannot reach the Hugging Face Hub at http://127.0.0.1:")
    assert "--from_dir PATH" in proc.stderr
    assert nothing_under(tmp_path / "checkpoints")


def test_gated_repo_downloads_with_the_token_from_hf_token(hub, tmp_path):
    hub.requests.clear()
    proc = llmcycle("download", "org/gated", cwd=tmp_path, endpoint=hub.url, HF_TOKEN=TOKEN)
    assert proc.returncode == 0, proc.stderr
    assert_logits_equal(tmp_path / "checkpoints" / "org" / "gated", hub.model)
    assert {r.headers.get("authorization") for r in hub.gets()} == {f"Bearer {TOKEN}"}


def test_interrupted_download_fails_cleanly_and_a_rerun_resumes(hub, tmp_path):
    last_shard = hub.shards[-1]
    hub.break_file(last_shard, after_bytes=1000)
    try:
        first = llmcycle("download", "org/tiny", cwd=tmp_path, endpoint=hub.url)
    finally:
        hub.restore()
    assert first.returncode == 2
    last_line = first.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: the download of org/tiny was interrupted (")
    assert "run the same command again to resume" in last_line
    assert "Traceback" not in first.stderr
    assert nothing_under(tmp_path / "checkpoints")

    hub.requests.clear()
    second = llmcycle("download", "org/tiny", cwd=tmp_path, endpoint=hub.url)
    assert second.returncode == 0, second.stderr
    assert fetched(hub, "org/tiny") == {last_shard}  # the rest was kept from the first run
    assert_logits_equal(tmp_path / "checkpoints" / "org" / "tiny", hub.model)


def test_a_complete_earlier_download_is_used_when_the_hub_is_unreachable(hub, tmp_path, capsys):
    cache = tmp_path / "cache"
    folder = fetch("org/tiny", endpoint=hub.url, cache_dir=cache)
    assert fetch("org/tiny", endpoint=closed_port_url(), cache_dir=cache) == folder
    assert "The Hub is unreachable; using the earlier download in" in capsys.readouterr().err

    (folder / hub.shards[0]).unlink()  # an incomplete snapshot is not used
    assert cached_snapshot("org/tiny", cache_dir=cache) is None
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub .* --from_dir PATH"):
        fetch("org/tiny", endpoint=closed_port_url(), cache_dir=cache)


@pytest.mark.parametrize("revision", ["v2", "sha"])
def test_download_of_a_revision_gives_that_revision(revision, hub, tmp_path):
    revision = hub.v2_sha if revision == "sha" else revision
    hub.requests.clear()
    proc = llmcycle("download", "org/tiny", "--revision", revision, cwd=tmp_path, endpoint=hub.url)
    assert proc.returncode == 0, proc.stderr
    assert_logits_equal(tmp_path / "checkpoints" / "org" / "tiny", hub.v2_model)
    asked = {r.path.split("/resolve/")[1].split("/")[0] for r in hub.gets()}
    assert asked and asked <= {revision, hub.v2_sha}  # never main's files
    assert fetched(hub, "org/tiny") == {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "model.safetensors",
    }  # fmt: skip


def test_hf_hub_offline_uses_a_complete_earlier_download_without_a_request(hub, tmp_path):
    for revision in (None, "v2"):  # earlier downloads into the cache the command line uses
        fetch("org/tiny", revision, endpoint=hub.url, cache_dir=tmp_path / "hf_home" / "hub")
    hub.requests.clear()
    for revision, model in (([], hub.model), (["--revision", "v2"], hub.v2_model)):
        proc = llmcycle(
            "download", "org/tiny", *revision, "--checkpoint_dir", "offline", cwd=tmp_path,
            endpoint=hub.url, HF_HUB_OFFLINE="1",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "HF_HUB_OFFLINE is set; using the earlier download in" in proc.stderr
        assert_logits_equal(tmp_path / "offline" / "org" / "tiny", model)
    assert hub.requests == []

    # Nothing in the cache: one line saying so, and still no request.
    proc = llmcycle("download", "org/gated", cwd=tmp_path, endpoint=hub.url, HF_HUB_OFFLINE="1")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: HF_HUB_OFFLINE is set and the Hugging Face cache holds")
    assert hub.requests == [] and nothing_under(tmp_path / "checkpoints")


def test_bin_weights_only_when_a_repo_has_no_safetensors(tmp_path, tokenizer_dir):
    model = make_hf_model("llama", tmp_path / "made", vocab_size=VOCAB)
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(tmp_path / "made" / "config.json", repo)
    shutil.copy(tokenizer_dir / "tokenizer.json", repo)
    torch.save(model.state_dict(), repo / "pytorch_model.bin")
    (repo / "flax_model.msgpack").write_bytes(b"not needed")
    with FakeHub() as fake:
        fake.add_repo("org/old", repo)
        folder = fetch("org/old", endpoint=fake.url, cache_dir=tmp_path / "cache")
        assert fetched(fake, "org/old") == {"config.json", "tokenizer.json", "pytorch_model.bin"}
    download("org/old", checkpoint_dir=tmp_path / "ckpts", from_dir=folder)
    assert_logits_equal(tmp_path / "ckpts" / "org" / "old", model)


def test_needed_files_prefers_indexed_safetensors(tmp_path):
    def index_of(*shards: str):
        path = tmp_path / f"index-{len(shards)}.json"
        path.write_text(json.dumps({"weight_map": {f"w{i}": s for i, s in enumerate(shards)}}))
        return lambda name: path

    get = index_of("m-1.safetensors", "m-2.safetensors", "m-2.safetensors")
    mistral = {"config.json", "consolidated.safetensors", "model.safetensors.index.json",
               "m-1.safetensors", "m-2.safetensors", "tokenizer.model", "params.json",
               "pytorch_model.bin"}  # fmt: skip
    assert needed_files(mistral, get, "org/m") == [
        "config.json", "tokenizer.model", "model.safetensors.index.json", "m-1.safetensors",
        "m-2.safetensors",
    ]  # fmt: skip
    both = {"config.json", "model.safetensors", "pytorch_model.bin", "vocab.json"}
    assert needed_files(both, get, "org/m") == ["config.json", "model.safetensors"]
    unnamed = {"config.json", "weights.safetensors", "sub/x.safetensors", "pytorch_model.bin"}
    assert needed_files(unnamed, get, "org/m") == ["config.json", "weights.safetensors"]
    bins = {"config.json", "pytorch_model.bin.index.json", "p-1.bin", "p-2.bin", "tf_model.h5"}
    assert needed_files(bins, index_of("p-1.bin", "p-2.bin"), "org/m") == [
        "config.json", "pytorch_model.bin.index.json", "p-1.bin", "p-2.bin",
    ]  # fmt: skip
    with pytest.raises(UserError, match="org/m has no safetensors or pytorch_model.bin weights"):
        needed_files({"config.json", "model.gguf"}, get, "org/m")


def test_reading_safetensors_without_a_memory_map_gives_the_same_tensors(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5, 2).bfloat16(),
        "f16": torch.randn(7).half(),
        "i64": torch.arange(6).view(2, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    got = dict(read_safetensors([tmp_path / "t.safetensors"]))
    assert got.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="bad.safetensors is not a valid safetensors file"):
        list(read_safetensors([tmp_path / "bad.safetensors"]))


def drop_a_tensor(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-100])


@pytest.mark.parametrize(
    "damage, message",
    [(drop_a_tensor, "weights missing for blocks.1.mlp.fc_2.weight"), (truncate, "is truncated")],
)
def test_a_failed_conversion_leaves_no_folder_behind(damage, message, tmp_path, tokenizer_dir):
    hf_folder("qwen3", tmp_path / "hf", tokenizer_dir)
    damage(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(UserError, match=message):
        download("org/broken", checkpoint_dir=tmp_path / "checkpoints", from_dir=tmp_path / "hf")
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_download_and_convert_to_hf(family, tmp_path, tokenizer_dir):
    original = tmp_path / "hf"
    hf_model = hf_folder(family, original, tokenizer_dir)
    download(f"org/{family}", checkpoint_dir=tmp_path / "checkpoints", from_dir=original)
    ckpt = tmp_path / "checkpoints" / "org" / family
    to_hf(ckpt, tmp_path / "exported")

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert back.config.model_type == hf_model.config.model_type
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, hf_model(idx).logits, atol=ATOL, rtol=0)

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "exported" / name).read_bytes() == (original / name).read_bytes()
    before = transformers.AutoTokenizer.from_pretrained(original)
    after = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert type(after) is type(before)
    for text in TEXTS:
        assert after(text)["input_ids"] == before(text)["input_ids"], text
    chat = [{"role": "user", "content": "Hi"}]
    assert after.apply_chat_template(chat, add_generation_prompt=True) == (
        before.apply_chat_template(chat, add_generation_prompt=True)
    )


@pytest.fixture(scope="module")
def data_hub(tmp_path_factory):
    """A fake Hub serving the data set org/texts: JSONL shards of two splits, a text file, and
    files a data set repo holds that are not data."""
    root = tmp_path_factory.mktemp("datasets") / "texts"
    (root / "data").mkdir(parents=True)
    for split, n in (("train", 3), ("test", 1)):
        rows = [{"text": f"{split} document {i}"} for i in range(n)]
        (root / "data" / f"{split}-00000.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    (root / "extra.txt").write_text("a plain text document\n")
    (root / "README.md").write_text("# texts\n")
    (root / ".gitattributes").write_text("*.jsonl filter=lfs\n")
    with FakeHub() as fake:
        fake.add_repo("org/texts", root, repo_type="dataset")
        yield fake


def test_download_dataset_gives_a_folder_that_data_path_reads(data_hub, tmp_path):
    from lifecycle_cli.data.readers import iter_texts, resolve_files

    proc = llmcycle("download", "--dataset", "org/texts", cwd=tmp_path, endpoint=data_hub.url)
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.split("--data.path ")[1].strip())
    assert folder.is_relative_to(tmp_path / "hf_home") and "datasets--org--texts" in str(folder)
    texts = sorted(iter_texts(resolve_files(folder)))
    assert texts == sorted(
        ["a plain text document\n", "test document 0"] + [f"train document {i}" for i in range(3)]
    )
    assert not (folder / "README.md").exists() and not (folder / ".gitattributes").exists()
    assert not (tmp_path / "checkpoints").exists()


def test_download_dataset_files_and_errors(data_hub, tmp_path):
    from lifecycle_cli.zoo.hub import fetch_dataset

    folder = fetch_dataset(
        "org/texts", files=["data/train-*"], endpoint=data_hub.url, cache_dir=tmp_path
    )
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.*")) == [
        "data/train-00000.jsonl"
    ]
    with pytest.raises(UserError, match="repo org/nothing not found on http://127.0.0.1:"):
        fetch_dataset("org/nothing", endpoint=data_hub.url, cache_dir=tmp_path)
    with pytest.raises(UserError, match=r"data set org/texts has no \*\.csv files .*--files GLOB"):
        fetch_dataset("org/texts", files=["*.csv"], endpoint=data_hub.url, cache_dir=tmp_path)
    with pytest.raises(UserError, match="give a model \\(org/tiny\\) or --dataset org/texts"):
        download("org/tiny", dataset="org/texts")
    with pytest.raises(UserError, match="--files applies to --dataset downloads"):
        download("org/tiny", files=["*.txt"])
