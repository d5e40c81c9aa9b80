"""LoRA: adapters injected into the one GPT train only themselves, merge back into plain weights,
and save to a small file that loads back exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError
from lifecycle_cli.linear import Linear
from lifecycle_cli.lora import (
    LoRAArgs,
    LoRALinear,
    has_lora,
    inject_lora,
    load_lora,
    lora_state_dict,
    merge_lora,
    save_lora,
)
from lifecycle_cli.model import GPT
from lifecycle_cli.objectives import masked_sft_loss, next_token_loss
from lifecycle_cli.zoo import named_config

FAMILIES = {  # name: what it exercises
    "SmolLM2-135M": {},  # grouped-query attention, tied head
    "pythia-14m": {},  # biases everywhere, parallel residual, partial RoPE, untied head
    "Mixtral-8x7B-v0.1": {"n_expert": 4},  # mixture of experts
    "gemma-2-2b": {},  # head_size 256 != n_embd / n_head, soft-capping, extra norms, tied head
}


def tiny(name: str, **overrides) -> Config:
    sizes = dict(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=64, block_size=32,
                 intermediate_size=64)  # fmt: skip
    return named_config(name, **sizes | FAMILIES[name] | overrides)


def model_for(config: Config, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def every_layer(config: Config) -> LoRAArgs:
    """Adapters wherever this model allows them."""
    return LoRAArgs(
        r=4, alpha=8, dropout=0.1, key=True, projection=True, mlp=True,
        head=not config.tie_embeddings, embedding=True,
    )  # fmt: skip


ARGS = {"query+value": lambda config: LoRAArgs(), "every layer": every_layer}
TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def train(model: GPT, steps: int = 4) -> None:
    """A few AdamW steps on random tokens, dropout on."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(2))
    model.train()
    for _ in range(steps):
        next_token_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("args_name", ARGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_start_as_a_no_op_and_only_they_train(family, args_name):
    model = model_for(tiny(family))
    base_logits = model(TOKENS)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = inject_lora(model, ARGS[args_name](model.config))

    assert not any(m.training for m in model.modules())  # eval mode kept
    # lora_B starts at zero, and dropout sits on the adapter path only: same logits, train or eval
    assert torch.equal(model(TOKENS), base_logits)
    assert torch.equal(model.train()(TOKENS), base_logits)
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(n.endswith((".lora_A", ".lora_B")) for n in adapters)
    assert trainable == sum(p.numel() for p in adapters.values())
    assert set(lora_state_dict(model)) == set(adapters)
    # base weights keep their names (`attn.qkv.weight`), next to the adapters
    assert set(model.state_dict()) == set(base_state) | set(adapters)
    if model.config.mlp == "moe" and args_name == "every layer":  # experts adapted, router not
        assert isinstance(model.blocks[0].mlp.experts[3].fc_2, LoRALinear)
        assert type(model.blocks[0].mlp.gate) is Linear

    train(model)
    adapted_logits = model(TOKENS)
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())  # base frozen

    merge_lora(model)
    assert not has_lora(model)
    assert all(type(m) is Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert type(model.wte) is nn.Embedding
    assert (model.lm_head.weight is model.wte.weight) == model.config.tie_embeddings
    assert list(model.state_dict()) == list(GPT(model.config).state_dict())
    torch.testing.assert_close(model(TOKENS), adapted_logits, atol=1e-5, rtol=1e-5)


def test_trainable_count_is_one_rank_r_adapter_per_enabled_projection():
    config = tiny("SmolLM2-135M")  # 4 query heads, 2 key/value groups of 8: q 32 rows, v 16
    n = inject_lora(model_for(config), LoRAArgs(r=8))
    per_layer = 2 * (8 * 32) + (32 + 16) * 8  # an A for q and one for v; B for their rows
    assert n == config.n_layer * per_layer


@pytest.mark.parametrize("part", ["query", "key", "value"])
def test_one_part_of_fused_qkv_changes_only_its_rows(part):
    config = tiny("SmolLM2-135M")
    model = model_for(config)
    base = model.blocks[1].attn.qkv.weight.clone()
    flags = dict.fromkeys(["query", "key", "value"], False) | {part: True}
    inject_lora(model, LoRAArgs(**flags))
    train(model, steps=2)
    merge_lora(model)
    q, kv = config.n_head * config.head_size, config.n_query_groups * config.head_size
    rows = {"query": slice(0, q), "key": slice(q, q + kv), "value": slice(q + kv, q + 2 * kv)}
    merged = model.blocks[1].attn.qkv.weight
    for name, span in rows.items():
        same = torch.equal(merged[span], base[span])
        assert same != (name == part), name


@pytest.mark.parametrize("family", ["pythia-14m", "SmolLM2-135M"])  # untied, tied head
def test_saved_adapters_are_small_and_load_back_exactly(tmp_path, family):
    config = tiny(family)
    args = every_layer(config)
    model = model_for(config)
    fresh = copy.deepcopy(model)  # the same base weights, no adapters
    trainable = inject_lora(model, args)
    train(model)
    adapted = model(TOKENS)

    path = tmp_path / "lora.safetensors"
    size = save_lora(model, path, args)
    assert size == path.stat().st_size
    assert 4 * trainable < size < 4 * trainable + 8192  # float32 adapters plus a JSON header
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(lora_state_dict(model))
        assert json.loads(f.metadata()["lora_args"])["r"] == args.r

    assert load_lora(fresh, path) == args
    assert torch.equal(fresh(TOKENS), adapted)
    merge_lora(fresh)
    torch.testing.assert_close(fresh(TOKENS), adapted, atol=1e-5, rtol=1e-5)


def test_adapters_follow_the_base_weights_dtype():
    model = model_for(tiny("SmolLM2-135M")).to(torch.bfloat16)
    inject_lora(model, LoRAArgs())
    assert {p.dtype for p in lora_state_dict(model).values()} == {torch.bfloat16}
    assert model(TOKENS).dtype == torch.bfloat16


def test_embedding_adapter_is_shared_by_a_tied_head():
    model = model_for(tiny("SmolLM2-135M"))
    inject_lora(model, LoRAArgs(query=False, value=False, embedding=True))
    assert set(lora_state_dict(model)) == {"wte.lora_A", "wte.lora_B"}  # saved once
    train(model)
    adapted = model(TOKENS)
    W = model.wte.weight + model.wte.lora_B @ model.wte.lora_A * model.wte.scaling
    merge_lora(model)
    assert model.lm_head.weight is model.wte.weight
    torch.testing.assert_close(model.wte.weight, W.detach())
    torch.testing.assert_close(model(TOKENS), adapted, atol=1e-5, rtol=1e-5)


def test_head_adapter_on_a_tied_model_is_refused():
    model = model_for(tiny("gemma-2-2b"))
    with pytest.raises(UserError, match="lora.embedding"):
        inject_lora(model, LoRAArgs(head=True))
    assert not has_lora(model)
    assert all(p.requires_grad for p in model.parameters())  # untouched


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(r=0), "lora.r"),
        (dict(dropout=1.0), "lora.dropout"),
        (dict(query=False, value=False), "adapts no layer"),
    ],
)
def test_bad_settings_are_one_clear_error(flags, message):
    with pytest.raises(UserError, match=message):
        inject_lora(model_for(tiny("pythia-14m")), LoRAArgs(**flags))


def test_injecting_twice_is_refused():
    model = model_for(tiny("pythia-14m"))
    inject_lora(model, LoRAArgs())
    with pytest.raises(UserError, match="already has LoRA"):
        inject_lora(model, LoRAArgs())


def test_mismatched_adapter_files_are_refused(tmp_path):
    model = model_for(tiny("pythia-14m"))
    args = LoRAArgs(r=4)
    inject_lora(model, args)
    path = tmp_path / "lora.safetensors"
    save_lora(model, path, args)

    other_shape = model_for(tiny("pythia-14m", n_embd=64))
    with pytest.raises(UserError, match="do not fit"):
        load_lora(other_shape, path)
    other_targets = model_for(tiny("pythia-14m"))
    inject_lora(other_targets, LoRAArgs(r=4, mlp=True))
    with pytest.raises(UserError, match="do not fit"):
        load_lora(other_targets, path)
    other_alpha = model_for(tiny("pythia-14m"))
    inject_lora(other_alpha, LoRAArgs(r=4, alpha=1))
    with pytest.raises(UserError, match="do not fit"):
        load_lora(other_alpha, path)

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(UserError, match="no LoRA settings"):
        load_lora(model_for(tiny("pythia-14m")), plain)
    (tmp_path / "junk.safetensors").write_text("not safetensors")
    for bad in (tmp_path / "junk.safetensors", tmp_path / "missing.safetensors"):
        with pytest.raises(UserError, match="cannot read"):
            load_lora(model_for(tiny("pythia-14m")), bad)


def test_trains_under_ddp():
    """Frozen base parameters are no obstacle to DistributedDataParallel (gloo, one process)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = model_for(tiny("SmolLM2-135M"))
    inject_lora(model, LoRAArgs())
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        next_token_loss(ddp, torch.randint(0, 64, (2, 9))).backward()
        # DDP's reducer holds the process group: freed after it, gloo's destructor can wait on
        # its threads forever (a CI run hung there once)
        del ddp
    finally:
        dist.destroy_process_group()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and set(grads) == set(lora_state_dict(model))


def test_compiled_training_follows_eager_as_lengths_change():
    """`--compile` with adapters on q, k and v: finetuning batches change length from step to
    step, and inductor's CPU backward must keep up (it once fixed a saved activation's stride
    at the first length and failed on the next)."""
    model = model_for(tiny("SmolLM2-135M"))
    for p in model.parameters():
        p.requires_grad_(False)
    inject_lora(model, LoRAArgs(r=4, alpha=8, dropout=0.0, key=True))
    compiled = torch.compile(model)
    adapters = [p for p in model.parameters() if p.requires_grad]
    for p in adapters:  # B too: every adapter's gradient then flows
        torch.nn.init.normal_(p, std=0.1)
    for batch, length in [(4, 17), (2, 12), (4, 23)]:
        ids = torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(3))
        labels = ids.clone()
        labels[:, : length // 2] = -100  # the head on reply positions only, as finetune runs it
        results = []
        for m in (model, compiled):
            loss = masked_sft_loss(m, {"input_ids": ids, "labels": labels})
            results.append((loss, torch.autograd.grad(loss, adapters)))
        (loss, grads), (compiled_loss, compiled_grads) = results
        torch.testing.assert_close(compiled_loss, loss)
        for g, compiled_g in zip(grads, compiled_grads):
            torch.testing.assert_close(compiled_g, g, atol=1e-5, rtol=1e-4)
