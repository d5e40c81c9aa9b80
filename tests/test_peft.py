"""A LoRA run's adapters outside the merged model: `convert to_peft` writes them in PEFT's format
(peft puts them on the `to_hf` export of the base: the logits of the merged final/), and
`--adapter` runs the base with them unmerged (the tokens of the merged final/)."""

from __future__ import annotations

from pathlib import Path
from pydoc_data.topics import topics

import peft
import pytest
import torch
import transformers

from lifecycle_cli import LLM
from lifecycle_cli.checkpoint import save_checkpoint
from lifecycle_cli.cli import main
from lifecycle_cli.lora import LoRAArgs, inject_lora, lora_state_dict, merge_lora, save_lora
from lifecycle_cli.model import GPT
from lifecycle_cli.prompts import save_prompt_style
from lifecycle_cli.serve.server import build_server
from lifecycle_cli.serve.worker import EngineAPI
from lifecycle_cli.tokenizer import train_bpe
from lifecycle_cli.zoo import named_config
from lifecycle_cli.zoo.convert import export_hf

SIZES = dict(n_layer=2, n_embd=32, n_head=4, block_size=64, intermediate_size=64)
GROUPS = {"SmolLM2-135M": 2, "Phi-3-mini-4k-instruct": 2}  # key/value heads (others: n_head)
EVERY_LAYER = dict(r=4, alpha=8, key=True, projection=True, mlp=True, embedding=True)
CASES = {  # what each exercises in the weight rules
    "SmolLM2-135M": EVERY_LAYER,  # q/k/v split, gate/up/down, tied head sharing the embedding's
    "pythia-14m": dict(EVERY_LAYER, head=True, rslora=True),  # heads interleaved in one qkv
    "Phi-3-mini-4k-instruct": dict(r=2, alpha=4, mlp=True),  # fused qkv_proj and gate_up_proj
    "gpt2": dict(r=2, alpha=2, projection=True, mlp=True),  # Conv1D (fan_in_fan_out)
}


def lora_run(folder: Path, name: str, args: LoRAArgs, tokenizer_dir: Path | None = None) -> Path:
    """What `finetune --method lora` leaves: base/ (the base), lora.safetensors beside final/ (the
    merged model), with adapters that are far from zero (as after training)."""
    vocab = 64 if tokenizer_dir is None else 400
    torch.manual_seed(0)
    groups = GROUPS.get(name, SIZES["n_head"])
    model = GPT(named_config(name, vocab_size=vocab, n_query_groups=groups, **SIZES)).eval()
    base = save_checkpoint(folder / "base", model, tokenizer_dir)
    inject_lora(model, args)
    with torch.no_grad():
        for tensor in lora_state_dict(model).values():
            tensor.normal_(0, 0.2)
    (folder / "run").mkdir()
    save_lora(model, folder / "run" / "lora.safetensors", args)
    merge_lora(model)
    save_checkpoint(folder / "run" / "final", model, tokenizer_dir)
    return base


@pytest.mark.parametrize("name", CASES)
def test_peft_loads_the_adapters_onto_the_exported_base_with_the_merged_logits(name, tmp_path):
    base = lora_run(tmp_path, name, LoRAArgs(**CASES[name]))
    assert (
        main(["convert", "to_peft", str(tmp_path / "run"), "--out_dir", str(tmp_path / "pe")]) == 0
    )
    export_hf(base, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tokens = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    before = hf(tokens).logits
    adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "pe").eval()
    with torch.no_grad():
        got = adapted(tokens).logits
        merged = LLM.load(tmp_path / "run" / "final").model(tokens)
    assert not torch.allclose(before, merged, atol=1e-3)  # the adapters change the output
    torch.testing.assert_close(got, merged, atol=2e-5, rtol=1e-4)


def test_adapter_flag_runs_the_base_unmerged_with_the_runs_style(tmp_path, capsys):
    tok = tmp_path / "tok"
    train_bpe(None, 400, tok, texts=["\n".join(topics.values())])
    base = lora_run(tmp_path, "SmolLM2-135M", LoRAArgs(r=4, alpha=8), tok)
    save_prompt_style("chatml", tmp_path / "run" / "final")  # finetune records the style
    final = LLM.load(tmp_path / "run" / "final")
    on_base = LLM.load(base, adapter=tmp_path / "run")
    assert on_base.prompt_style().name == "chatml" and LLM.load(base).prompt_style().name == "plain"
    tokens = torch.randint(0, 400, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(on_base.model(tokens), final.model(tokens), atol=2e-5, rtol=1e-4)
    kw = dict(max_new_tokens=10, temperature=0)
    expected = final.generate("Name a colour.", **kw)
    assert on_base.generate("Name a colour.", **kw) == expected
    capsys.readouterr()
    args = ["--prompt", "Name a colour.", "--temperature", "0", "--max_new_tokens", "10"]
    assert main(["generate", str(base), *args, "--adapter", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", str(base), *args, "--adapter", str(tmp_path)]) == 2
    assert "no LoRA adapters found" in capsys.readouterr().err

    # serve: the HTTP side formats in the run's style, the worker loads the base + adapters.
    server = build_server(base, adapter=tmp_path / "run" / "final", device="cpu")
    front = next(r.endpoint.__self__ for r in server.app.routes if r.path == "/predict")
    assert front.info.style.name == "chatml"
    worker = EngineAPI(base, max_batch_size=1, batch_timeout=0, precision=None, device="cpu",
                       adapter=tmp_path / "run")  # fmt: skip
    worker.setup("cpu")
    with torch.no_grad():
        torch.testing.assert_close(worker.engine.model(tokens), final.model(tokens), atol=2e-5,
                                   rtol=1e-4)  # fmt: skip
