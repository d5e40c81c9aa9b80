"""`--dry_run` planning: parameters, FLOPs, Chinchilla sizes, memory, time and cost."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lifecycle_cli.cli import main
from lifecycle_cli.config import Config
from lifecycle_cli.curate import plan as P
from lifecycle_cli.curate.plan import PlanArgs, make_plan
from lifecycle_cli.errors import UserError
from lifecycle_cli.lora import LoRAArgs
from lifecycle_cli.zoo import FAMILIES, named_config

# Hand-computed from the published architectures (no embedding/head biases, RMSNorm):
# Llama-3.2-1B: embedding 128256*2048 = 262,668,288 (tied head); per block 2*2048 (norms)
#   + 2048*(32+2*8)*64 (qkv) + 2048*2048 (proj) + 3*2048*8192 (SwiGLU) = 60,821,504;
#   16 blocks + final norm 2048 -> 1,235,814,400.
LLAMA_32_1B = 1_235_814_400
LLAMA_32_1B_NON_EMBEDDING = 1_235_814_400 - 262_668_288
# Llama-2-7b: embedding and head 32000*4096 each; per block 2*4096 + 4096*3*4096
#   + 4096*4096 + 3*4096*11008 = 202,383,360; 32 blocks + 4096 -> 6,738,415,616.
LLAMA_2_7B = 6_738_415_616

# The lecture's table of training compute (6·N·D).
GPT3 = Config(
    name="GPT-3-175B", block_size=2048, vocab_size=50257, n_layer=96, n_embd=12288,
    n_head=96, position_embedding="learned", tie_embeddings=True,
)  # fmt: skip
LLAMA2_70B = dataclasses.replace(
    named_config("Llama-2-7b-hf"), name="Llama-2-70b", n_layer=80, n_embd=8192, n_head=64,
    n_query_groups=8, intermediate_size=28672,
)  # fmt: skip


def meta_count(config: Config) -> int:
    from lifecycle_cli.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    return sum(p.numel() for p in model.parameters())


def test_parameters_of_the_named_models_match_hand_counts_and_the_real_model():
    llama1b, llama7b = P.count_params(named_config("Llama-3.2-1B")), None
    assert llama1b.total == LLAMA_32_1B
    assert llama1b.non_embedding == LLAMA_32_1B_NON_EMBEDDING
    llama7b = P.count_params(named_config("Llama-2-7b-hf"))
    assert llama7b.total == LLAMA_2_7B
    # Every named config, and shapes the zoo lacks (MoE, biases, learned positions, qk norm),
    # counted in closed form as the real module holds them.
    configs = [named_config(c["name"]) for family in FAMILIES for c in family.CONFIGS]
    configs += [
        GPT3,
        LLAMA2_70B,
        Config(n_layer=2, n_embd=64, n_head=4, mlp="moe", n_expert=4, n_expert_per_token=2,
               intermediate_size=96, norm="rmsnorm", bias=False),
        Config(n_layer=2, n_embd=64, n_head=4, bias=False, attn_bias=True, lm_head_bias=True,
               qk_norm=True, post_attention_norm=True, post_mlp_norm=True, mlp="geglu"),
    ]  # fmt: skip
    for config in configs:
        assert P.count_params(config).total == meta_count(config), config.name


def test_flops_match_the_lecture_table_and_the_training_loop():
    # 7B on 1T ≈ 4.2e22, GPT-3 175B on 300B ≈ 3.1e23, Llama 2 70B on 2T ≈ 8.4e23
    for config, tokens, lecture in (
        (named_config("Llama-2-7b-hf"), 1e12, 4.2e22),
        (GPT3, 300e9, 3.1e23),
        (LLAMA2_70B, 2e12, 8.4e23),
    ):
        flops = P.training_flops(config, 2048, tokens)
        assert abs(flops["6ND"] / lecture - 1) < 0.10, config.name
        assert flops["total"] > flops["6ND"] * 0.95  # attention adds; a tied head counts
    # The figure the loop divides by for MFU (throughput.flops_per_token) is the same one.
    from lifecycle_cli.train.throughput import flops_per_token

    for name in ("Llama-3.2-1B", "Llama-2-7b-hf", "SmolLM2-135M"):
        config = named_config(name)
        assert P.training_flops(config, 1024, 1)["total"] == flops_per_token(config, 1024)


def test_chinchilla_sizes():
    ch = P.chinchilla(7e9, 1e12, 6 * 7e9 * 1e12)
    assert ch["tokens_for_size"] == 140e9
    assert ch["size_for_tokens"] == 50e9
    # C = 6·N·D with D = 20·N: N = sqrt(C / 120)
    assert ch["size_for_compute"] == pytest.approx((6 * 7e9 * 1e12 / 120) ** 0.5)
    assert ch["tokens_for_compute"] == pytest.approx(20 * ch["size_for_compute"])


def test_memory_per_billion_parameters_matches_the_lecture():
    config = named_config("Llama-3.2-1B")
    n = LLAMA_32_1B
    fp32 = P.memory(config, "32-true", 1, 2048)
    assert fp32["weights"] == 4 * n  # 4 GB per billion to store
    assert fp32["gradients"] == 4 * n
    assert fp32["optimizer"] == 8 * n  # AdamW: two float32 states per weight
    states = fp32["weights"] + fp32["gradients"] + fp32["optimizer"]
    assert states == 16 * n
    assert fp32["total"] == states + fp32["activations"]
    bf16 = P.memory(config, "bf16-true", 1, 2048)
    assert (bf16["weights"], bf16["gradients"], bf16["optimizer"]) == (2 * n, 2 * n, 4 * n)
    # Checkpointing keeps less; FSDP divides the states by the devices and adds one gathered
    # block (twice, for prefetch).
    ckpt = P.memory(config, "32-true", 1, 2048, checkpointing=True)
    assert ckpt["activations"] < fp32["activations"] / 2
    fsdp = P.memory(config, "32-true", 1, 2048, devices=8, checkpointing=True)
    block = P.count_params(config).per_block[0]
    assert fsdp["weights"] == 4 * n / 8 + 2 * 4 * block
    assert fsdp["optimizer"] == 8 * n / 8
    assert fsdp["activations"] == ckpt["activations"]
    # Activations grow with the micro batch.
    assert P.memory(config, "32-true", 4, 2048)["activations"] == 4 * fp32["activations"]


@pytest.mark.parametrize("name, groups", [("SmolLM2-135M", 2), ("gpt2", 4)])
def test_activation_estimate_is_close_to_what_autograd_keeps(name, groups):
    from lifecycle_cli.model import GPT
    from lifecycle_cli.objectives import next_token_loss

    config = named_config(name, n_layer=2, n_embd=128, n_head=4, n_query_groups=groups,
                          intermediate_size=384, vocab_size=1024)  # fmt: skip
    model = GPT(config)
    batch_size, seq = 2, 64
    model.max_seq_length = seq
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    batch = torch.randint(0, config.vocab_size, (batch_size, seq + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        next_token_loss(model, batch)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(size for ptr, size in storages.items() if ptr not in weights)
    tokens = batch_size * seq
    logits = 4 * config.vocab_size * tokens  # held by the loss function, not saved
    estimate = P.activations_per_token(config, 4, False) * tokens
    estimate -= 4 * config.vocab_size * tokens  # the logits' gradient, which backward makes
    assert 0.8 < estimate / (saved + logits) < 1.3


def test_lora_parameters_equal_what_inject_lora_adds():
    from lifecycle_cli.lora import inject_lora
    from lifecycle_cli.model import GPT

    tied = named_config("SmolLM2-135M", n_layer=2, n_embd=64, n_head=4, n_query_groups=2,
                        intermediate_size=96, vocab_size=300)  # fmt: skip
    moe = Config(n_layer=2, n_embd=64, n_head=4, mlp="moe", n_expert=3, n_expert_per_token=1,
                 intermediate_size=48, vocab_size=200)  # fmt: skip
    cases = [
        (tied, LoRAArgs()),
        (tied, LoRAArgs(r=4, key=True, projection=True, mlp=True, embedding=True)),
        (moe, LoRAArgs(r=2, query=False, value=False, mlp=True, head=True)),
    ]
    for config, args in cases:
        assert P.lora_params(config, args) == inject_lora(GPT(config), args)


def test_lora_and_qlora_keep_the_base_frozen():
    config = named_config("Llama-2-7b-hf")
    params = P.count_params(config)
    n_lora = P.lora_params(config, LoRAArgs())
    lora = P.memory(config, "bf16-true", 1, 512, method="lora", lora_n=n_lora)
    assert lora["weights"] == 2 * (params.total + n_lora)
    assert lora["gradients"] == 2 * n_lora and lora["optimizer"] == 4 * n_lora
    qlora = P.memory(config, "bf16-true", 1, 512, method="qlora", lora_n=n_lora)
    rest = params.total - params.block_linear
    assert qlora["weights"] == pytest.approx(
        params.block_linear * P.NF4_BYTES + 2 * (rest + n_lora)
    )
    assert qlora["weights"] < lora["weights"] / 3
    # No weight gradients for the frozen base: 4·N per token instead of 6·N.
    full = P.training_flops(config, 512, 1e9)
    frozen = P.training_flops(config, 512, 1e9, "lora", n_lora)
    n = P.active_params(config, params)
    assert frozen["weights"] == (4 * n + 6 * n_lora) * 1e9
    assert full["weights"] == 6 * n * 1e9


def test_time_and_cost_from_the_peak():
    config = named_config("Llama-2-7b-hf")
    args = PlanArgs(peak_tflops=100, mfu=0.5, gpus=4, dollars_per_gpu_hour=2.0)
    plan = make_plan(config, args, seq_length=1024, micro_batch=1, tokens=1e9, tokens_from="")
    hours = plan.flops["total"] / (100e12 * 0.5 * 4) / 3600
    assert plan.hours == pytest.approx(hours)
    assert plan.cost == pytest.approx(hours * 4 * 2.0)
    h100 = make_plan(config, PlanArgs(gpu="h100"), seq_length=1024, micro_batch=1, tokens=1e9,
                     tokens_from="")  # fmt: skip
    assert h100.peak == 989.4e12  # bf16 dense datasheet peak
    with pytest.raises(UserError, match="--plan.gpu 'Z80'"):
        make_plan(config, PlanArgs(gpu="Z80"), seq_length=8, micro_batch=1, tokens=1,
                  tokens_from="")  # fmt: skip


def test_dry_run_prints_the_plan_without_data_or_out_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main([
        "pretrain", "Llama-3.2-1B", "--dry_run", "true", "--tokenizer.vocab_size", "128256",
        "--train.max_seq_length", "2048", "--train.micro_batch_size", "1",
        "--train.max_tokens", str(10**12), "--data.path", "does/not/exist",
        "--plan.gpu", "A100", "--plan.dollars_per_gpu_hour", "2", "--devices", "8",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert list(tmp_path.iterdir()) == []  # no out_dir, no cache, nothing
    assert "1,235,814,400 total" in out and f"{LLAMA_32_1B_NON_EMBEDDING:,} non-embedding" in out
    assert "4.94 GB in fp32" in out
    assert "16 bytes/param (weights 4 + gradients 4 + AdamW 8) = 19.77 GB" in out
    assert "'1B: 24 GB to train'" in out and "29.66 GB" in out
    assert "FSDP over 8 devices" in out
    assert "24.72B tokens are optimal" in out  # 20 x 1.236B
    cost = next(line for line in out.splitlines() if line.startswith("Time at 312.0 TFLOP/s"))
    assert "$" in cost


def test_dry_run_plans_a_from_scratch_vocab_and_a_finetune(tmp_path, capsys):
    assert main(["pretrain", "Llama-3.2-1B", "--dry_run", "true", "--train.max_steps", "10",
                 "--train.max_seq_length", "512"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "vocab 4096 is the BPE the run trains" in out
    assert "Training tokens: 327.68K (--train.max_steps" in out  # 10 x 64 x 512
    assert main(["finetune", "Llama-2-7b-hf", "--dry_run", "true", "--method", "qlora",
                 "--train.max_steps", "100", "--train.max_seq_length", "512"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "Trainable (qlora): 4,194,304 adapter parameters" in out  # r 8 on q and v, 32 layers
    assert "Chinchilla" not in out  # a pretraining figure
    assert main(["finetune", str(tmp_path / "missing"), "--dry_run", "true"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_measure_times_real_steps_on_this_device():
    config = Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, block_size=32)
    plan = make_plan(config, PlanArgs(measure=True, measure_steps=1), seq_length=16,
                     micro_batch=2, tokens=1e6, tokens_from="")  # fmt: skip
    assert plan.measured["tokens_per_sec"] > 0
    assert plan.measured["hours"] == pytest.approx(1e6 / plan.measured["tokens_per_sec"] / 3600)
    assert any(line.startswith("Measured on cpu") for line in plan.lines())


def test_measure_refuses_a_model_too_large_for_this_machine():
    with pytest.raises(UserError, match="--plan.measure: training Llama-2-70b needs about"):
        make_plan(LLAMA2_70B, PlanArgs(measure=True), seq_length=16, micro_batch=1, tokens=1e6,
                  tokens_from="")  # fmt: skip


def test_align_dry_run_counts_both_responses_and_the_reference(capsys):
    config = named_config("Llama-2-7b-hf")
    gb = P.count_params(config).total * 2  # bf16 weights

    def plan_of(*flags: str) -> str:
        assert main(["align", "Llama-2-7b-hf", "--dry_run", "true", "--precision", "bf16-true",
                     "--train.max_steps", "10", "--train.global_batch_size", "8",
                     "--train.micro_batch_size", "2", "--train.max_seq_length", "512",
                     *flags]) == 0  # fmt: skip
        return capsys.readouterr().out

    full = plan_of("--method", "full")
    # Two sequences (chosen, rejected) per pair: 10 steps x 8 pairs x 2 x 512 tokens.
    assert "Training tokens: 81.92K" in full and "2 pairs per micro batch are 4 sequences" in full
    assert "reference model (a frozen copy)" in full and "reference forward" in full
    lora = plan_of("--method", "lora")
    assert "reference model (a frozen copy)" not in lora and "reference forward" in lora
    pre = plan_of("--method", "full", "--precompute_ref", "true")
    assert "reference model (a frozen copy)" not in pre
    simpo = plan_of("--method", "full", "--objective", "simpo")
    assert "reference" not in simpo  # reference-free
    # Full DPO holds the weights twice: the frozen copy is as big as the policy's weights.
    mem = P.memory(config, "bf16-true", 4, 512, method="full", reference_copy=True)
    assert mem["reference"] == gb and mem["total"] == pytest.approx(
        sum(v for k, v in mem.items() if k != "total")
    )


def test_dry_run_plans_fsdp_times_tensor_parallel_and_refuses_what_the_run_would(capsys):
    """--tensor_parallel N: a rank holds 1/N of the blocks' linear weights (what the plan
    shards) and the rest whole, FSDP shards that over devices / N; a split the run refuses is
    refused by the plan in one line."""
    config = named_config("Llama-2-7b-hf")
    params = P.count_params(config)
    args = dict(seq_length=4096, micro_batch=1, tokens=None, tokens_from="", devices=16)
    plan = make_plan(config, PlanArgs(), tensor_parallel=8, **args)
    tp = plan.memory["32-true"]["fsdp_tp"]
    held = params.block_linear / 8 + params.total - params.block_linear
    assert tp["gradients"] == pytest.approx(held / 2 * 4)  # 2 data-parallel ranks, fp32
    assert tp["optimizer"] == pytest.approx(held / 2 * 8)
    fsdp = plan.memory["32-true"]["fsdp"]
    assert tp["activations"] < fsdp["activations"]  # a rank keeps its heads' share
    assert "fsdp_tp" not in make_plan(config, PlanArgs(), **args).memory["32-true"]

    assert main(["pretrain", "Llama-2-7b-hf", "--dry_run", "true", "--devices", "8",
                 "--num_nodes", "2", "--tensor_parallel", "8"]) == 0  # fmt: skip
    assert "total, FSDP 2 x TP 8 + checkpointing" in capsys.readouterr().out
    for flags, message in [
        (["--devices", "8", "--tensor_parallel", "3"], "does not divide the 8 device(s)"),
        (["--devices", "6", "--tensor_parallel", "6"], "n_head 32 does not divide by 6"),
    ]:
        assert main(["pretrain", "Llama-2-7b-hf", "--dry_run", "true", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
