"""Compute planning (`--dry_run`): what a training run costs before it starts.

Everything is computed in closed form from the `Config`, so a 70B plan allocates nothing:
parameters (total and non-embedding), training FLOPs (6·N·D plus attention), the Chinchilla
sizes (~20 tokens per parameter), memory per device for each precision (weights, gradients,
AdamW states, activations; with activation checkpointing and FSDP sharding; LoRA/QLoRA keep the
base frozen), and wall time and cost from a GPU's datasheet peak at an assumed MFU. With
`--plan.measure` a few real steps on this machine's device replace the assumed throughput.

Units: GB = 1e9 bytes, as in the rule of thumb "1B parameters: 4 GB to store, 24 GB to train
in fp32".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError
from lifecycle_cli.gpus import PEAK_TFLOPS

if TYPE_CHECKING:
    from lifecycle_cli.lora import LoRAArgs

GB = 1e9
CHINCHILLA_TOKENS_PER_PARAM = 20
# The lecture's rule of thumb for fp32 training: 4 (weights) + 4 (gradients) + 8 (AdamW)
# + about 8 for activations and temporary buffers = 24 bytes per parameter.
RULE_OF_THUMB_TRAIN_BYTES = 24


# Bytes per parameter of (weights, gradients, AdamW's two states) and per activation value,
# as Lightning runs each precision: "-mixed" keeps float32 weights and autocasts the math.
PRECISIONS = {
    "32-true": (4, 4, 8, 4),
    "bf16-mixed": (4, 4, 8, 2),
    "16-mixed": (4, 4, 8, 2),
    "bf16-true": (2, 2, 4, 2),
    "16-true": (2, 2, 4, 2),
}
NF4_BYTES = 0.5 + 0.5 / 64 + 4 / (64 * 256)  # 4 bits, an 8-bit scale per 64, float per 256


@dataclass
class PlanArgs:
    """The hardware `--dry_run` plans for."""

    gpu: str = "H100"
    """GPU whose datasheet dense peak sets the time: B200, H200, H100, H800, A100, A10G, L40S,
    L4, V100, 4090, MI300X."""
    peak_tflops: Optional[float] = None
    """Peak TFLOP/s of one device, instead of the --plan.gpu datasheet figure."""
    mfu: float = 0.4
    """Model FLOPs utilisation assumed: the share of the peak a real run achieves."""
    gpus: Optional[int] = None
    """Devices the run uses (default: --devices x --num_nodes)."""
    dollars_per_gpu_hour: Optional[float] = None
    """Rental price of one device for one hour; gives the cost."""
    measure: bool = False
    """Also time a few real training steps of the model on this machine's device (it must
    fit) and estimate the run from that throughput."""
    measure_steps: int = 3
    """Timed steps of --plan.measure (after one warm-up step)."""


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass
class Params:
    total: int
    embedding: int  # token (and learned position) embeddings
    head: int  # the output head when it has its own matrix (0 when tied)
    block_linear: int  # weights of the blocks' linear layers (what QLoRA packs to 4 bits)
    per_block: list[int] = field(default_factory=list)

    @property
    def non_embedding(self) -> int:
        """Every parameter but the embeddings (an untied head counts, as Kaplan et al.)."""
        return self.total - self.embedding


def _norm(config: Config, size: int) -> int:
    return size if config.norm == "rmsnorm" else 2 * size  # LayerNorm has a bias too


def count_params(config: Config) -> Params:
    """The parameters of `GPT(config)`, counted from the config alone."""
    e, hs, nh, kv = config.n_embd, config.head_size, config.n_head, config.n_query_groups
    inter, v = config.intermediate_size, config.vocab_size
    qkv_out = (nh + 2 * kv) * hs
    per_block, small = [], 0
    for layer in range(config.n_layer):
        n_norms = 2 * config.pre_norm + config.post_attention_norm + config.post_mlp_norm
        norms = _norm(config, e) * n_norms
        if config.qk_norm:
            norms += 2 * hs if config.qk_norm_scope == "head" else (nh + kv) * hs
        norms += nh if config.attention_sinks else 0
        biases = (qkv_out if config.attn_bias else 0) + (e if config.bias else 0)
        attn = e * qkv_out + nh * hs * e
        moe = config.is_moe(layer)
        size = config.expert_intermediate_size if moe else inter
        if config.mlp == "gelu":
            mlp, mlp_bias = 2 * e * size, (size + e if config.bias else 0)
        else:
            mlp, mlp_bias = 3 * e * size, (2 * size + e if config.bias else 0)
        router = 0
        if moe:
            mlp, mlp_bias = mlp * config.n_expert, mlp_bias * config.n_expert
            router = e * config.n_expert + (config.n_expert if config.router_bias else 0)
        per_block.append(norms + biases + attn + mlp + mlp_bias + router)
        small += norms + biases + mlp_bias + router
    embedding = v * e + (config.block_size * e if config.position_embedding == "learned" else 0)
    head = 0 if config.tie_embeddings else e * v
    head_bias = v if config.lm_head_bias else 0
    total = embedding + sum(per_block) + _norm(config, e) + head + head_bias
    return Params(total, embedding, head, sum(per_block) - small, per_block)


def active_params(config: Config, params: Params) -> int:
    """Weights one token multiplies (the FLOPs' N): all but the embedding lookup, the head
    counted even when tied, only the chosen experts of a mixture of experts."""
    n = params.non_embedding + (config.vocab_size * config.n_embd if config.tie_embeddings else 0)
    if config.mlp == "moe":
        expert = 3 * config.n_embd * config.expert_intermediate_size
        sparse = sum(config.is_moe(layer) for layer in range(config.n_layer))
        n -= sparse * expert * (config.n_expert - config.n_expert_per_token)
    return n


def lora_params(config: Config, lora: LoRAArgs) -> int:
    """Trainable adapter parameters `inject_lora` adds for these options."""
    e, hs, r = config.n_embd, config.head_size, lora.r
    rows = {"query": config.n_head * hs, "key": config.n_query_groups * hs}
    rows["value"] = rows["key"]
    parts = [rows[p] for p in ("query", "key", "value") if getattr(lora, p)]
    per_block = (r * len(parts) * e + sum(parts) * r) if parts else 0
    if lora.projection:
        per_block += r * config.n_head * hs + e * r
    if lora.mlp:
        layers = 2 if config.mlp == "gelu" else 3
        experts = config.n_expert if config.mlp == "moe" else 1
        per_block += experts * layers * r * (e + config.intermediate_size)
    total = per_block * config.n_layer
    if lora.head:
        total += r * (e + config.vocab_size)
    if lora.embedding:
        total += r * (e + config.vocab_size)
    return total


# ---------------------------------------------------------------------------------------------
# FLOPs and Chinchilla


def attention_flops_per_token(config: Config, seq_length: int) -> float:
    """Training FLOPs per token of the attention scores and weighted sums (not in 6·N)."""
    return 6 * config.n_layer * config.n_head * config.head_size * seq_length


def training_flops(
    config: Config,
    seq_length: int,
    tokens: float,
    method: str = "full",
    lora_n: int = 0,
    reference: bool = False,
) -> dict[str, float]:
    """FLOPs of training on `tokens` tokens: "6ND" (N = all parameters, the lecture's
    estimate), "weights" (active weights: 6 per weight per token; 4 with a frozen LoRA base,
    whose weights get no gradient, plus 6 per adapter weight), "attention", "reference" (with
    `reference`, DPO/IPO's forward pass of the reference model: 2 per weight per token, and a
    third of the attention), and "total"."""
    params = count_params(config)
    n = active_params(config, params)
    per_weight = 6 * n if method == "full" else 4 * n + 6 * lora_n
    attention = attention_flops_per_token(config, seq_length) * tokens
    weights = per_weight * tokens
    ref = (2 * n * tokens + attention / 3) if reference else 0.0
    return {
        "6ND": 6 * params.total * tokens,
        "weights": weights,
        "attention": attention,
        "reference": ref,
        "total": weights + attention + ref,
    }


def chinchilla(params: int, tokens: Optional[float], flops: Optional[float]) -> dict[str, float]:
    """Chinchilla's ~20 tokens per parameter: the tokens optimal for this size, the size
    optimal for the given tokens, and both for the same compute (C = 6·N·D)."""
    out = {"tokens_for_size": CHINCHILLA_TOKENS_PER_PARAM * params}
    if tokens:
        out["size_for_tokens"] = tokens / CHINCHILLA_TOKENS_PER_PARAM
    if flops:
        n = math.sqrt(flops / (6 * CHINCHILLA_TOKENS_PER_PARAM))
        out["size_for_compute"], out["tokens_for_compute"] = n, n * CHINCHILLA_TOKENS_PER_PARAM
    return out


# ---------------------------------------------------------------------------------------------
# Memory


def activations_per_token(
    config: Config, act_bytes: int, checkpointing: bool, tensor_parallel: int = 1
) -> float:
    """Bytes kept for the backward pass per token of a micro batch (an estimate).

    Per block: the input and output of both norms (4·E), queries/keys/values ((nh + 2kv)·hs),
    the attention output and its reshaped copy (2·nh·hs, fused attention keeps no T×T
    scores), and the MLP's hidden values (4·I gated: gate, activation, up, product; 2·I GELU;
    times the chosen experts of a mixture). With activation checkpointing a block keeps its
    input only, and one block's values exist at a time while it is recomputed. The head adds
    its input and the logits with their float32 log-softmax and gradient (V·(A + 8)).
    Under tensor parallelism a rank keeps its share of the heads' and the MLP's values; the
    norms' values, the block inputs and the (replicated) head's stay whole.
    """
    e, hs, nh, kv = config.n_embd, config.head_size, config.n_head, config.n_query_groups
    mlp = (2 if config.mlp == "gelu" else 4) * config.intermediate_size
    if config.mlp == "moe":
        mlp *= config.n_expert_per_token
    block = (4 * e + ((nh + 2 * kv) * hs + 2 * nh * hs + mlp) / tensor_parallel) * act_bytes
    head = 2 * e * act_bytes + config.vocab_size * (act_bytes + 8)
    if checkpointing:
        return config.n_layer * e * act_bytes + block + head
    return config.n_layer * block + e * act_bytes + head


def memory(
    config: Config,
    precision: str,
    micro_batch: int,
    seq_length: int,
    devices: int = 1,
    checkpointing: bool = False,
    method: str = "full",
    lora_n: int = 0,
    reference_copy: bool = False,
    tensor_parallel: int = 1,
) -> dict[str, float]:
    """Bytes per device to train: "weights", "gradients", "optimizer" (AdamW), "activations"
    and "total" (and "reference": a frozen copy of the weights, full DPO/IPO's reference
    model, with `reference_copy`). `devices` > 1 shards the weights, gradients, states and
    reference FSDP-style (and adds one gathered block being computed, twice for prefetch).
    `method` lora/qlora: frozen base weights (4-bit blocks for qlora), gradients and AdamW
    states for the adapters only. `tensor_parallel` N (full training): the blocks' linear
    weights are split over N ranks (the rest replicated), FSDP then shards over the devices / N
    data-parallel ranks, and a rank keeps its share of the heads' and MLP's activations."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: planning knows {', '.join(PRECISIONS)}")
    w, g, o, a = PRECISIONS[precision]
    params = count_params(config)
    if method == "full":
        weights, grads, optim = params.total * w, params.total * g, params.total * o
    else:
        base = params.total * w
        if method == "qlora":
            base = params.block_linear * NF4_BYTES + (params.total - params.block_linear) * w
        weights, grads, optim = base + lora_n * w, lora_n * g, lora_n * o
    ref = params.total * w if reference_copy else 0.0
    gathered, block = 0.0, max(params.per_block or [0])
    tp = tensor_parallel
    if tp > 1:  # the share of the weights one tensor-parallel rank holds
        kept = (params.block_linear / tp + params.total - params.block_linear) / params.total
        weights, grads, optim, ref = weights * kept, grads * kept, optim * kept, ref * kept
        block /= tp
    if devices // tp > 1:
        dp = devices // tp
        weights, grads, optim = weights / dp, grads / dp, optim / dp
        ref /= dp
        gathered = 2 * block * w
    tokens = micro_batch * seq_length
    acts = activations_per_token(config, a, checkpointing, tp) * tokens
    parts = {"weights": weights + gathered, "gradients": grads, "optimizer": optim}
    if reference_copy:
        parts["reference"] = ref
    parts["activations"] = acts
    parts["total"] = sum(parts.values())
    return parts


# ---------------------------------------------------------------------------------------------
# The plan


def peak_flops(args: PlanArgs, precision: str) -> float:
    """FLOP/s of one device: --plan.peak_tflops, else the --plan.gpu datasheet."""
    if args.peak_tflops is not None:
        if args.peak_tflops <= 0:
            raise UserError(f"--plan.peak_tflops must be > 0, got {args.peak_tflops}")
        return args.peak_tflops * 1e12
    gpu = args.gpu.upper().removeprefix("NVIDIA ")
    if gpu not in PEAK_TFLOPS:
        raise UserError(
            f"--plan.gpu {args.gpu!r} is not in the table ({', '.join(PEAK_TFLOPS)}); "
            "give its peak with --plan.peak_tflops"
        )
    half, single = PEAK_TFLOPS[gpu]
    return (single if precision == "32-true" else half) * 1e12


@dataclass
class Plan:
    """The figures `--dry_run` prints (`lines()`), as numbers for scripts and tests."""

    config: Config
    method: str
    seq_length: int
    micro_batch: int
    tokens: float
    tokens_from: str  # where the token count came from
    precision: str
    devices: int
    params: Params
    lora_n: int
    flops: dict[str, float]
    chinchilla: dict[str, float]
    memory: dict[str, dict[str, dict[str, float]]]  # precision -> variant -> part -> bytes
    peak: float
    mfu: float
    gpus: int
    hours: float  # wall-clock hours
    dollars_per_gpu_hour: Optional[float]
    measured: Optional[dict[str, float]] = None
    notes: list[str] = field(default_factory=list)
    pretraining: bool = True  # Chinchilla's sizes are about pretraining only
    tensor_parallel: int = 1

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.gpus

    @property
    def cost(self) -> Optional[float]:
        rate = self.dollars_per_gpu_hour
        return None if rate is None else self.gpu_hours * rate

    def lines(self) -> list[str]:
        return _format(self)


def make_plan(
    config: Config,
    args: PlanArgs,
    *,
    seq_length: int,
    micro_batch: int,
    tokens: Optional[float],
    tokens_from: str,
    precision: Optional[str] = None,
    devices: int = 1,
    method: str = "full",
    lora: Optional[LoRAArgs] = None,
    reference: bool = False,
    reference_copy: bool = False,
    tensor_parallel: int = 1,
) -> Plan:
    """The plan of training `config` on `tokens` tokens (None: Chinchilla-optimal); with
    `reference`, a DPO-style run whose reference model scores every sequence (and, with
    `reference_copy`, is a second copy of the weights in memory); with `tensor_parallel` N, the
    memory of FSDP x N-way tensor parallelism over the devices too."""
    if not 0 < args.mfu <= 1:
        raise UserError(f"--plan.mfu must be in (0, 1], got {args.mfu}")
    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"--plan.gpus must be at least 1, got {args.gpus}")
    precision = precision or "bf16-mixed"
    tp = tensor_parallel
    if tp > 1:  # what the run itself would refuse
        from lifecycle_cli.train.tensor_parallel import check_tensor_parallel

        if devices % tp:
            raise UserError(f"--tensor_parallel {tp} does not divide the {devices} device(s)")
        if method != "full":
            raise UserError("--tensor_parallel does not shard LoRA adapters yet; plan without it")
        check_tensor_parallel(config, tp)
    elif tp < 1:
        raise UserError(f"--tensor_parallel {tp} must be at least 1")
    params = count_params(config)
    lora_n = lora_params(config, lora) if method != "full" and lora is not None else 0
    if tokens is None:
        tokens = CHINCHILLA_TOKENS_PER_PARAM * params.total
        tokens_from = f"Chinchilla-optimal for this size ({CHINCHILLA_TOKENS_PER_PARAM}/param)"
    flops = training_flops(config, seq_length, tokens, method, lora_n, reference)
    mem: dict[str, dict[str, dict[str, float]]] = {}

    def need(p: str, n_devices: int, checkpointing: bool, tp: int = 1) -> dict[str, float]:
        return memory(
            config, p, micro_batch, seq_length, n_devices, checkpointing, method, lora_n,
            reference_copy, tp,
        )  # fmt: skip

    for p in ("32-true", "bf16-mixed", "bf16-true"):
        mem[p] = {"plain": need(p, 1, False), "checkpointed": need(p, 1, True)}
        if devices > 1:
            mem[p]["fsdp"] = need(p, devices, True)
        if tp > 1:
            mem[p]["fsdp_tp"] = need(p, devices, True, tp)
    if precision not in mem:
        mem[precision] = {"plain": need(precision, 1, False)}
    peak, gpus = peak_flops(args, precision), args.gpus or devices
    hours = flops["total"] / (peak * args.mfu * gpus) / 3600
    plan = Plan(
        config, method, seq_length, micro_batch, tokens, tokens_from, precision, devices, params,
        lora_n, flops, chinchilla(params.total, tokens, flops["6ND"]), mem, peak, args.mfu, gpus,
        hours, args.dollars_per_gpu_hour, tensor_parallel=tp,
    )  # fmt: skip
    if args.measure:
        plan.measured = measure(config, precision, micro_batch, seq_length, args.measure_steps)
        rate = plan.measured["tokens_per_sec"]
        plan.measured["hours"] = tokens / (rate * gpus) / 3600
    return plan


def _num(x: float) -> str:
    """1.24B, 4.2e22: short numbers for the table."""
    if x >= 1e15:
        return f"{x:.2e}"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def _format(p: Plan) -> list[str]:
    c, n, billions = p.config, p.params, p.params.total / 1e9
    out = [
        f"Plan for {c.name or 'the model'}: {c.n_layer} layers, {c.n_embd} wide, vocab "
        f"{c.vocab_size}, {p.seq_length} tokens per sample, micro batch {p.micro_batch}",
        f"Parameters: {n.total:,} total ({_num(n.total)}), {n.non_embedding:,} non-embedding, "
        f"{n.embedding:,} embedding" + (" (tied with the head)" if c.tie_embeddings else ""),
    ]
    if p.method != "full":
        share = 100 * p.lora_n / n.total
        out.append(f"Trainable ({p.method}): {p.lora_n:,} adapter parameters ({share:.3f}%)")
    f = p.flops
    out += [
        f"Training tokens: {_num(p.tokens)} ({p.tokens_from})",
        f"Training FLOPs: {f['total']:.3e} = weights {f['weights']:.3e} + attention "
        f"{f['attention']:.3e}"
        + (f" + reference forward {f['reference']:.3e}" if f.get("reference") else "")
        + f"; the lecture's 6·N·D: {f['6ND']:.3e}",
    ]
    if p.pretraining:
        out.append(_chinchilla_line(p))
    out.append(
        f"To store: {_gb(4 * n.total)} GB in fp32, {_gb(2 * n.total)} GB in bf16, "
        f"{_gb(n.total)} GB in int8 (4 GB per billion parameters in fp32)"
    )
    out += _memory_table(p)
    if p.method == "full":
        w, g, o, _ = PRECISIONS["32-true"]
        out.append(
            f"fp32 training states: {w + g + o} bytes/param (weights {w} + gradients {g} + "
            f"AdamW {o}) = {_gb((w + g + o) * n.total)} GB; rule of thumb '1B: 24 GB to train' "
            f"({RULE_OF_THUMB_TRAIN_BYTES} bytes/param, activations included): "
            f"{billions * RULE_OF_THUMB_TRAIN_BYTES:.2f} GB"
        )
    out.append(
        f"Time at {p.peak / 1e12:.1f} TFLOP/s peak x MFU {p.mfu} x {p.gpus} device(s) "
        f"({p.precision}): {_hours(p.hours)}, {p.gpu_hours:,.1f} GPU-hours"
        + ("" if p.cost is None else f", ${p.cost:,.0f} at ${p.dollars_per_gpu_hour}/GPU-hour")
    )
    if p.measured:
        m = p.measured
        out.append(
            f"Measured on {m['device']}: {m['tokens_per_sec']:,.0f} tokens/s "
            f"({m['flops_per_sec'] / 1e12:.3f} TFLOP/s achieved); the run would take "
            f"{_hours(m['hours'])} on {p.gpus} such device(s)"
        )
    return out + p.notes


def _chinchilla_line(p: Plan) -> str:
    ch, n = p.chinchilla, p.params.total
    line = f"Chinchilla (~{CHINCHILLA_TOKENS_PER_PARAM} tokens/param): "
    line += f"{_num(ch['tokens_for_size'])} tokens are optimal for {_num(n)} parameters"
    if "size_for_tokens" in ch:
        line += f"; {_num(ch['size_for_tokens'])} parameters are optimal for "
        line += f"{_num(p.tokens)} tokens"
    if "size_for_compute" in ch:
        line += (
            f"; the same compute is best spent on {_num(ch['size_for_compute'])} parameters x "
            f"{_num(ch['tokens_for_compute'])} tokens"
        )
    return line


def _hours(h: float) -> str:
    if h < 1:
        return f"{h * 60:.1f} minutes"
    return f"{h:,.1f} hours" if h < 48 else f"{h / 24:,.1f} days"


def _memory_table(p: Plan) -> list[str]:
    names = [x for x in ("32-true", "bf16-mixed", "bf16-true") if x in p.memory]
    names += [x for x in p.memory if x not in names]
    head = f"{'Memory per device (GB)':<44}" + "".join(f"{x:>12}" for x in names)
    rows = [head]
    labels = {
        "weights": "weights" + (" (frozen base + adapters)" if p.method != "full" else ""),
        "gradients": "gradients",
        "optimizer": "AdamW states (2 per trainable weight)",
        "reference": "reference model (a frozen copy)",
        "activations": f"activations ({p.micro_batch} x {p.seq_length} tokens)",
        "total": "total",
    }
    for part, label in labels.items():
        if part not in p.memory[names[0]]["plain"]:
            continue
        cells = "".join(f"{_gb(p.memory[x]['plain'][part]):>12}" for x in names)
        rows.append(f"  {label:<42}" + cells)
    extra = [("checkpointed", "activations", "activations, activation checkpointing")]
    extra.append(("checkpointed", "total", "total, activation checkpointing"))
    if p.devices > 1:
        extra.append(("fsdp", "total", f"total, FSDP over {p.devices} devices + checkpointing"))
    if p.tensor_parallel > 1:
        dp, tp = p.devices // p.tensor_parallel, p.tensor_parallel
        extra.append(("fsdp_tp", "total", f"total, FSDP {dp} x TP {tp} + checkpointing"))
    for variant, part, label in extra:
        cells = "".join(
            f"{_gb(p.memory[x][variant][part]) if variant in p.memory[x] else '-':>12}"
            for x in names
        )
        rows.append(f"  {label:<42}" + cells)
    return rows


# ---------------------------------------------------------------------------------------------
# Measuring on this machine


def measure(
    config: Config, precision: str, micro_batch: int, seq_length: int, steps: int = 3
) -> dict[str, Any]:
    """Tokens/s of `steps` full training steps (forward, backward, AdamW) of a randomly
    initialised `GPT(config)` on this machine's device, after one warm-up step."""
    import time

    import torch

    from lifecycle_cli.model import GPT
    from lifecycle_cli.objectives import next_token_loss

    if steps < 1:
        raise UserError(f"--plan.measure_steps must be at least 1, got {steps}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # a model too large for RAM is killed, not an OutOfMemoryError
        import os

        need = count_params(config).total * sum(PRECISIONS.get(precision, (4, 4, 8, 4))[:3])
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        if need > free:
            raise UserError(
                f"--plan.measure: training {config.name or 'the model'} needs about "
                f"{need / GB:.1f} GB for its weights and optimizer, more than the "
                f"{free / GB:.1f} GB free here; plan without --plan.measure"
            )
    true_dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision)
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    try:
        with torch.device(device):
            model = GPT(config)
        model.max_seq_length = seq_length
        if true_dtype is not None:
            model = model.to(true_dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator(device="cpu").manual_seed(0)
        batch = torch.randint(0, config.vocab_size, (micro_batch, seq_length + 1), generator=g)
        batch = batch.to(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        start = 0.0
        for i in range(steps + 1):
            if i == 1:
                sync()
                start = time.perf_counter()
            with torch.autocast(device.type, autocast, enabled=autocast is not None):
                loss = next_token_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        seconds = time.perf_counter() - start
    except torch.OutOfMemoryError:
        raise UserError(
            f"--plan.measure: {config.name or 'the model'} does not fit on {device} at micro "
            f"batch {micro_batch} x {seq_length}; plan without --plan.measure"
        ) from None
    rate = steps * micro_batch * seq_length / seconds
    per_token = training_flops(config, seq_length, 1)["total"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"device": name, "tokens_per_sec": rate, "flops_per_sec": rate * per_token}
