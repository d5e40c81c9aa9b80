"""GGUF files (llama.cpp, Ollama, LM Studio) <-> checkpoint folders, through llama.cpp's own
`gguf` package: its reader, writer, tensor-name table and `quants` (de)quantizers.

Both ways pass through Hugging Face names and layout, so that the family's weight rules do the
rest as they do for `download --from_dir` and `convert to_hf`:

    GGUF tensor  <->  Hugging Face tensor  <->  checkpoint tensor
    blk.0.attn_q      model.layers.0.self_attn.q_proj      blocks.0.attn.qkv
    (gguf's TensorNameMap; llama.cpp's changes undone: Llama's q/k row order, Gemma's norm + 1)

The tokenizer travels as llama.cpp stores it (tokenizer.ggml.*: tokens, token types, merges,
special ids, the pre-tokenizer's name, the chat template) and is rebuilt as a tokenizer.json.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class Arch:
    """A llama.cpp architecture and how its GGUF tensors differ from Hugging Face's."""

    name: str  # general.architecture
    model_type: str  # the Hugging Face model_type an imported file becomes
    exported: tuple[str, ...]  # our hf_model_types written as this architecture
    permute_qk: bool = False  # llama.cpp's rotary layout: q/k rows interleaved per head
    norm_offset: float = 0.0  # Gemma: llama.cpp's RMSNorm multiplies by the stored weight
    norm: str = "rmsnorm"  # the norm llama.cpp computes ("layernorm": with a bias)
    mlp: str = "swiglu"  # the MLP llama.cpp computes
    rope: bool = True  # False: learned position embeddings (GPT-2)
    biases: bool = False  # biases on every linear layer and norm, required (GPT-2, GPT-NeoX)
    post_norm: bool = False  # norms after attention and MLP (Gemma 2/3 beside pre-norms; OLMo 2)


ARCHES = (
    # llama.cpp runs Mistral checkpoints as `llama` (its own converter writes them so).
    Arch("llama", "llama", ("llama", "mistral", "mixtral"), permute_qk=True),
    Arch("qwen2", "qwen2", ("qwen2",)),
    Arch("qwen3", "qwen3", ("qwen3",)),
    Arch("qwen3moe", "qwen3_moe", ("qwen3_moe",)),
    Arch("gemma", "gemma", ("gemma",), norm_offset=1.0, mlp="geglu"),
    Arch("gemma2", "gemma2", ("gemma2",), norm_offset=1.0, mlp="geglu", post_norm=True),
    Arch("gemma3", "gemma3_text", ("gemma3_text", "gemma3"), norm_offset=1.0, mlp="geglu",
         post_norm=True),
    Arch("gpt2", "gpt2", ("gpt2",), norm="layernorm", mlp="gelu", rope=False, biases=True),
    Arch("gptneox", "gpt_neox", ("gpt_neox",), norm="layernorm", mlp="gelu", biases=True),
    Arch("phi3", "phi3", ("phi3",)),
    Arch("olmo2", "olmo2", ("olmo2",), post_norm=True),
    Arch("smollm3", "smollm3", ("smollm3",), permute_qk=True),
)  # fmt: skip
# GPT-2's Conv1D weights, stored (in, out) by Hugging Face and (out, in) by llama.cpp
GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
EXPERT = re.compile(r"\.experts\.(\d+)\.")  # a Hugging Face tensor of one expert
SMOLLM3_NOPE_STEP = 4  # llama.cpp fixes it (no GGUF key): layer i skips RoPE where (i+1) % 4 == 0

# llama.cpp's names for pre-tokenizers (tokenizer.ggml.pre) and the tokenizer.json regex each
# stands for (None: byte-level BPE's own GPT-2 regex).
GPT2_PRE = ("gpt-2", "default", "olmo", "mpt", "jais")
DIGITS_PRE = ("smollm", "starcoder", "refact", "codeshell")  # each digit alone, then GPT-2
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PRE = {
    "llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT,
    "falcon3": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT, "dbrx": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT,
}  # fmt: skip
# llama.cpp's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def arch_named(name: Any, path: Path) -> Arch:
    for arch in ARCHES:
        if arch.name == name:
            return arch
    raise UserError(
        f"{path}: GGUF architecture {name!r} is not supported "
        f"(supported: {', '.join(a.name for a in ARCHES)})"
    )


def arch_for(config: Config, source: Path) -> Arch:
    for arch in ARCHES:
        if config.hf_model_type in arch.exported:
            return arch
    names = ", ".join(t for a in ARCHES for t in a.exported)
    raise UserError(
        f"{source}: the {config.hf_model_type or 'unnamed'} family cannot be written as GGUF "
        f"(llama.cpp architectures written: {names})"
    )


# --------------------------------------------------------------------------------------------
# Reading


def read_gguf(path: Path):
    """The open GGUFReader of `path` and its metadata as plain values."""
    from gguf import GGUFReader

    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"{path} is not a valid GGUF file ({e})") from None
    meta = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            meta[key] = field.contents()
    return reader, meta


def hf_config_from_gguf(meta: dict[str, Any], names: set[str], vocab_rows: int, path: Path):
    """A config.json (Hugging Face keys) for the model a GGUF's metadata describes."""
    arch = arch_named(meta.get("general.architecture"), path)

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch.name}.{key}", default)

    def need(key: str) -> Any:
        value = get(key)
        if value is None:
            raise UserError(f"{path}: metadata {arch.name}.{key} is missing")
        if isinstance(value, list):
            raise UserError(f"{path}: {arch.name}.{key} differs per layer; not supported")
        return value

    n_expert = get("expert_count")
    if n_expert and arch.name not in ("llama", "qwen3moe"):
        raise UserError(f"{path}: mixture-of-experts {arch.name} files are not supported")
    n_head, n_embd, n_layer = (
        need("attention.head_count"),
        need("embedding_length"),
        need("block_count"),
    )
    head_dim = get("attention.key_length") or n_embd // n_head
    if arch.name == "gpt2":
        return arch, dict(
            model_type="gpt2", n_positions=get("context_length", 1024), n_embd=n_embd,
            n_layer=n_layer, n_head=n_head, n_inner=need("feed_forward_length"),
            layer_norm_epsilon=get("attention.layer_norm_epsilon", 1e-5),
            activation_function="gelu_new", vocab_size=vocab_rows,
            tie_word_embeddings="output.weight" not in names,
        )  # fmt: skip
    if arch.name == "gptneox":
        # llama.cpp computes GELU with its tanh approximation; Pythia was trained with the exact one
        return arch, dict(
            model_type="gpt_neox", max_position_embeddings=get("context_length", 2048),
            hidden_size=n_embd, num_hidden_layers=n_layer, num_attention_heads=n_head,
            intermediate_size=need("feed_forward_length"),
            rotary_pct=get("rope.dimension_count", head_dim) / head_dim,
            rotary_emb_base=float(get("rope.freq_base", 10000.0)),
            layer_norm_eps=get("attention.layer_norm_epsilon", 1e-5), hidden_act="gelu",
            use_parallel_residual=bool(get("use_parallel_residual", True)),
            vocab_size=vocab_rows, tie_word_embeddings="output.weight" not in names,
        )  # fmt: skip
    hf: dict[str, Any] = dict(
        model_type=arch.model_type,
        max_position_embeddings=get("context_length", 4096),
        hidden_size=n_embd,
        num_hidden_layers=n_layer,
        intermediate_size=need("feed_forward_length"),
        num_attention_heads=n_head,
        num_key_value_heads=get("attention.head_count_kv") or n_head,
        head_dim=head_dim,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        vocab_size=vocab_rows,
        tie_word_embeddings="output.weight" not in names,
    )
    if isinstance(hf["num_key_value_heads"], list):
        raise UserError(f"{path}: {arch.name}.attention.head_count_kv differs per layer")
    if get("rope.dimension_count", head_dim) != head_dim:
        raise UserError(f"{path}: partial rotary embeddings are not supported")
    if arch.name == "smollm3":
        hf["no_rope_layer_interval"] = SMOLLM3_NOPE_STEP
    if n_expert and arch.name == "llama":  # Mixtral, as llama.cpp runs it
        hf.update(model_type="mixtral", num_local_experts=n_expert,
                  num_experts_per_tok=need("expert_used_count"))  # fmt: skip
    elif n_expert:
        hf.update(
            num_experts=n_expert, num_experts_per_tok=need("expert_used_count"),
            moe_intermediate_size=need("expert_feed_forward_length"), norm_topk_prob=True,
        )  # fmt: skip
    scaling = get("rope.scaling.type")
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    elif scaling == "yarn":
        hf["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": get("rope.scaling.factor"),
            "original_max_position_embeddings": get("rope.scaling.original_context_length"),
            "beta_fast": get("rope.scaling.yarn_beta_fast", 32.0),
            "beta_slow": get("rope.scaling.yarn_beta_slow", 1.0),
        }
        if get("rope.scaling.yarn_attn_factor") is not None:
            hf["rope_scaling"]["attention_factor"] = get("rope.scaling.yarn_attn_factor")
    elif scaling not in (None, "none"):
        raise UserError(f"{path}: rope scaling {scaling!r} is not supported")
    if arch.name in ("gemma2", "gemma3"):
        # llama.cpp's own rule for the query scale (Gemma's 27B models: n_embd / n_head)
        big = n_layer == (46 if arch.name == "gemma2" else 62)
        hf.update(
            query_pre_attn_scalar=n_embd // n_head if big else head_dim,
            final_logit_softcapping=get("final_logit_softcapping"),
            sliding_window=get("attention.sliding_window", 4096 if arch.name == "gemma2" else None),
            hidden_activation="gelu_pytorch_tanh",
        )
    if arch.name == "gemma2":
        hf["attn_logit_softcapping"] = get("attn_logit_softcapping")
    if arch.name == "gemma3":
        pattern = get("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # one flag per layer: True where the layer slides
            hf["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
        else:
            hf["sliding_window_pattern"] = pattern
        hf["rope_local_base_freq"] = float(get("rope.freq_base_swa", 10000.0))
    return arch, hf


def llama3_scaling(factors: np.ndarray, hf: dict[str, Any], path: Path) -> dict[str, Any]:
    """The Llama 3 RoPE scaling that llama.cpp's `rope_freqs` factors were made from (the
    published Llama 3.x values of low/high frequency factor and original context)."""
    import torch

    from lifecycle_cli.rope import llama3_inv_freq

    scaling = dict(
        factor=float(factors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_seq_len=8192,
    )  # fmt: skip
    dim = hf["head_dim"]
    inv = 1.0 / (hf["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    expected = (inv / llama3_inv_freq(inv, scaling)).numpy()
    if expected.shape != factors.shape or abs(expected - factors).max() > 1e-3 * scaling["factor"]:
        raise UserError(f"{path}: rope_freqs does not match Llama 3's RoPE scaling")
    return {
        "rope_type": "llama3",
        "factor": scaling["factor"],
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def hf_names(config: Config) -> list[str]:
    """Every Hugging Face tensor name of a model of `config` (a layer's experts in order)."""
    from lifecycle_cli.zoo import family_for

    names = []
    layers, moe_layers = range(config.n_layer), [i for i in range(config.n_layer) if
                                                 config.is_moe(i)]  # fmt: skip
    for rule in family_for(config.hf_model_type).weight_rules(config):
        for name in rule.hf:
            if name.count("{}") == 2:  # layer, expert
                names += [name.format(i, e) for i in moe_layers for e in range(config.n_expert)]
            elif "{}" in name:
                names += [name.format(i) for i in layers]
            else:
                names.append(name)
    return names


def name_table(arch: Arch, config: Config) -> dict[str, str]:
    """Hugging Face tensor name -> GGUF tensor name, by gguf's own table (every expert of a
    layer -> the one tensor that stacks them)."""
    import gguf

    tensor_map = gguf.get_tensor_name_map(gguf_arch(arch), config.n_layer)
    table = {}
    for name in hf_names(config):
        merged = EXPERT.sub(".experts.", name)
        gguf_name = tensor_map.get_name(merged, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"llama.cpp's {arch.name} has no tensor for {name}")
        table[name] = gguf_name
    return table


def gguf_arch(arch: Arch):
    import gguf

    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name)


def permute_qk(w: torch.Tensor, n_head: int, to_gguf: bool) -> torch.Tensor:
    """llama.cpp's rotary layout for Llama q/k rows (convert_hf_to_gguf's `permute`) and back."""
    shape = w.shape
    half = shape[0] // n_head // 2
    if to_gguf:
        return w.reshape(n_head, 2, half, *shape[1:]).swapaxes(1, 2).reshape(shape)
    return w.reshape(n_head, half, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def to_llama_cpp(name: str, t: torch.Tensor, arch: Arch, config: Config, to_gguf: bool):
    """A Hugging Face tensor in llama.cpp's layout (to_gguf) or back."""
    from lifecycle_cli.zoo.convert import transform

    if arch.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_qk(t, config.n_head, to_gguf)
    if arch.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_qk(t, config.n_query_groups, to_gguf)
    if arch.norm_offset and name.endswith("norm.weight"):
        return t + arch.norm_offset if to_gguf else t - arch.norm_offset
    if arch.name == "gpt2" and name.endswith(GPT2_CONV1D):
        return t.T.contiguous()
    if arch.name == "gptneox" and ".query_key_value." in name:  # heads interleaved -> q; k; v
        return transform("neox_qkv", [t], config, to_ours=to_gguf)[0]
    return t


def import_gguf(
    path: Path | str, out_dir: Path | str, dtype: Optional[str] = None, name: str = ""
) -> Config:
    """Convert a GGUF file into a checkpoint folder at `out_dir`: weights dequantized by
    `gguf.quants` (float32 unless `dtype`), config from the metadata, tokenizer rebuilt."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    from lifecycle_cli.checkpoint import DEFAULT_SHARD_BYTES, atomic_dir
    from lifecycle_cli.zoo.convert import config_from_hf, torch_dtype, write_converted

    path = Path(path)
    target = torch_dtype(dtype)
    reader, meta = read_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: no token_embd.weight tensor; not a language model GGUF")
    vocab_rows = int(tensors["token_embd.weight"].shape[1])
    arch, hf = hf_config_from_gguf(meta, set(tensors), vocab_rows, path)
    if "rope_freqs.weight" in tensors:
        factors = dequantize(
            tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].tensor_type
        )
        hf["rope_scaling"] = llama3_scaling(np.asarray(factors).reshape(-1), hf, path)
    config = config_from_hf(hf, name or meta.get("general.name") or path.stem)
    from_gguf: dict[str, list[str]] = {}  # several names: that layer's experts, in order
    for hf_name, gguf_name in name_table(arch, config).items():
        from_gguf.setdefault(gguf_name, []).append(hf_name)
    unknown = sorted(set(tensors) - set(from_gguf) - {"rope_freqs.weight"})
    if unknown:
        raise UserError(f"{path}: unexpected tensor {unknown[0]!r} for a {arch.name} model")
    tokenizer_files = tokenizer_from_gguf(meta, path, config.block_size)

    def hf_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for t in reader.tensors:
            if t.name not in from_gguf:
                continue
            try:
                values = dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise UserError(
                    f"{path}: tensor {t.name} is {t.tensor_type.name}, which gguf cannot dequantize"
                ) from None
            shape = tuple(int(d) for d in reversed(t.shape))
            tensor = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
            targets = from_gguf[t.name]
            if EXPERT.search(targets[0]):  # (experts, ...) -> one tensor per expert
                yield from ((name, part.clone()) for name, part in zip(targets, tensor))
            else:
                yield targets[0], to_llama_cpp(targets[0], tensor, arch, config, to_gguf=False)

    with atomic_dir(out_dir) as tmp:
        write_converted(tmp, config, hf_tensors(), target, DEFAULT_SHARD_BYTES, path)
        for file_name, content in tokenizer_files.items():
            (tmp / file_name).write_text(content, encoding="utf-8")
    return config


def tokenizer_from_gguf(meta: dict[str, Any], path: Path, context: int) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and generation_config.json of a GGUF's tokenizer."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(
            f"{path}: tokenizer.ggml.model {kind!r} cannot be rebuilt yet (supported: gpt2, "
            "the byte-level BPE of Llama 3, Qwen, SmolLM, GPT-2)"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]
    pre = meta.get("tokenizer.ggml.pre", "default")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=SPLIT_PRE.get(pre) == LLAMA3_SPLIT))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in SPLIT_PRE)
    if pre in SPLIT_PRE:
        split = pre_tokenizers.Split(Regex(SPLIT_PRE[pre]), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    elif pre in DIGITS_PRE:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    elif pre in GPT2_PRE:
        tok.pre_tokenizer = byte_level
    else:
        raise UserError(
            f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported (supported: "
            f"{', '.join([*GPT2_PRE, *DIGITS_PRE, *SPLIT_PRE])})"
        )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types)
         if t == CONTROL]
    )  # fmt: skip
    tok.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types)
         if t == USER_DEFINED]
    )  # fmt: skip

    def token(key: str) -> Optional[str]:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", SPLIT_PRE.get(pre) == LLAMA3_SPLIT)
    if add_bos and bos is not None:
        bos_id = vocab[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(add_bos),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    stops = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    generation = {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(dict.fromkeys(i for i in stops if isinstance(i, int))),
    }
    return {
        "tokenizer.json": tok.to_str(),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "generation_config.json": json.dumps(generation, indent=2) + "\n",
    }


# --------------------------------------------------------------------------------------------
# Writing

# --dtype -> (type of 2-D weights, general.file_type); 1-D tensors (norms, biases) stay F32,
# and so do the tensors llama.cpp's converter always keeps F32 (routers, learned positions).
ALWAYS_F32 = ("ffn_gate_inp.weight", "position_embd.weight")
EXPORT_DTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7),
                 "q4_0": ("Q4_0", 2)}  # fmt: skip


def check_exportable(config: Config, arch: Arch, source: Path) -> None:
    """Refuse, naming it, what llama.cpp's `arch` would not compute as our model does."""
    gemma2, gemma3, olmo2 = (arch.name == n for n in ("gemma2", "gemma3", "olmo2"))
    nope, moe = sorted(config.nope_layers or ()), config.mlp == "moe"
    every_4th = [i for i in range(config.n_layer) if (i + 1) % SMOLLM3_NOPE_STEP == 0]
    refused = [
        (moe and arch.name not in ("llama", "qwen3moe"), "mixture-of-experts layers"),
        (moe and bool(config.dense_layers), "dense layers between mixture-of-experts layers"),
        (moe and not config.moe_norm_topk, "experts' weights left unnormalised (norm_topk_prob)"),
        (moe and arch.name == "llama" and config.expert_intermediate_size !=
         config.intermediate_size, "experts narrower than intermediate_size"),
        (config.router_bias, "a router bias"),
        (config.swiglu_limit is not None, "a clamped SwiGLU"),
        (config.norm != arch.norm, f"norm {config.norm!r}"),
        ((config.position_embedding == "rope") != arch.rope,
         "learned position embeddings" if arch.rope else "RoPE"),
        (config.rotary_percentage != 1.0 and arch.name != "gptneox", "partial rotary embeddings"),
        (bool(nope) and arch.name != "smollm3", "layers without RoPE (nope_layers)"),
        (arch.name == "smollm3" and nope != every_4th,
         "layers without RoPE other than every 4th (llama.cpp's fixed SmolLM3 pattern)"),
        (config.bias != arch.biases, "biases on the attention output and MLP (bias: true)"
         if config.bias else "linear layers without biases"),
        (config.attn_bias and arch.name not in ("llama", "qwen2", "gpt2", "gptneox"),
         "q/k/v biases"),
        (arch.biases and not config.attn_bias, "q/k/v without biases"),
        (config.n_query_groups != config.n_head and arch.name in ("gpt2", "gptneox"),
         "grouped-query attention"),
        (config.lm_head_bias, "a bias on the output head"),
        (config.qk_norm and arch.name not in ("qwen3", "qwen3moe", "gemma3", "olmo2"),
         "QK-norm"),
        (olmo2 and not config.qk_norm, "attention without QK-norm"),
        (config.qk_norm and config.qk_norm_scope != ("all" if olmo2 else "head"),
         f"QK-norm over {'each head' if olmo2 else 'whole projections'}"),
        (config.attention_sinks, "attention sinks"),
        (config.attention_logit_softcapping is not None and not gemma2, "attention soft-capping"),
        (config.final_logit_softcapping is not None and not (gemma2 or gemma3),
         "final logit soft-capping"),
        ((config.post_attention_norm, config.post_mlp_norm) != (arch.post_norm,) * 2,
         "this layout of norms after attention and MLP"),
        (config.pre_norm == olmo2, "this layout of norms before attention and MLP"),
        (config.parallel_residual and arch.name != "gptneox", "this residual layout"),
        (config.rope_local_base is not None and not gemma3, "a RoPE base for local layers"),
        ((config.rope_scaling or {}).get("type") == "llama3" and arch.name != "llama",
         "Llama 3 RoPE scaling"),
        (bool(config.rope_scaling) and not arch.rope, "RoPE scaling"),
        (gemma2 and config.sliding_window_pattern != 2, "this sliding-window pattern"),
        (config.norm_unit_offset != bool(arch.norm_offset), "this RMSNorm offset"),
        (config.scale_embeddings != bool(arch.norm_offset), "scaled input embeddings"),
        (("swiglu" if moe else config.mlp) != arch.mlp, f"mlp {config.mlp!r}"),
        (config.attention_scale is not None and not (gemma2 or gemma3)
         and abs(config.attention_scale - config.head_size**-0.5) > 1e-6,
         "a query scale other than 1/sqrt(head size)"),
    ]  # fmt: skip
    if gemma2 or gemma3:  # llama.cpp fixes the query scale from the model's shape
        big = config.n_layer == (46 if gemma2 else 62)
        scale = (config.n_embd // config.n_head if big else config.head_size) ** -0.5
        refused.append(
            (abs((config.attention_scale or config.head_size**-0.5) - scale) > 1e-6,
             f"attention_scale other than llama.cpp's {scale:.6g}")
        )  # fmt: skip
    for bad, what in refused:
        if bad:
            raise UserError(
                f"{source}: llama.cpp's {arch.name} cannot run {what} "
                f"({config.hf_model_type} checkpoint); nothing written"
            )


def detect_pre_tokenizer(tokenizer_json: dict[str, Any], source: Path) -> str:
    """llama.cpp's name for a tokenizer.json's pre-tokenizer, read from its structure."""

    def byte_level(p: dict, regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) == regex

    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(parts) == 1 and byte_level(parts[0], True):
        return "gpt-2"
    if len(parts) == 2 and parts[0].get("type") == "Digits" and byte_level(parts[1], True):
        if parts[0].get("individual_digits"):
            return "smollm"
    if len(parts) == 2 and parts[0].get("type") == "Split" and byte_level(parts[1], False):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        for name in ("llama-bpe", "qwen2"):
            if regex == SPLIT_PRE[name]:
                return name
    raise UserError(
        f"{source}: tokenizer.json's pre-tokenizer is not one llama.cpp names (supported: "
        "GPT-2's byte-level BPE, SmolLM's, Llama 3's, Qwen 2's)"
    )


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int]  # bos, eos, unk, pad -> id
    add_bos: bool
    chat_template: Optional[str]


def vocab_for_gguf(checkpoint_dir: Path, config: Config) -> GGUFVocab:
    """The tokenizer of a checkpoint as llama.cpp stores it (read before anything is written)."""
    from lifecycle_cli.prompts import CHAT_TEMPLATE, read_style_file
    from lifecycle_cli.tokenizer import Tokenizer
    from lifecycle_cli.zoo.templates import jinja_template

    path = checkpoint_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{checkpoint_dir} has no tokenizer.json; a GGUF must carry its tokenizer")
    tokenizer = Tokenizer(checkpoint_dir)
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(
            f"{path}: only byte-level BPE tokenizers can be written to GGUF yet "
            f"(this one: {model.get('type')}, byte_fallback {bool(model.get('byte_fallback'))})"
        )
    normalizer = (data.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise UserError(f"{path}: normalizer {normalizer!r} cannot be written to GGUF")
    pre = detect_pre_tokenizer(data, path)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"{path}: {tokenizer.vocab_size} tokens but the model has {config.vocab_size} rows"
        )
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(config.vocab_size):
        token = tokenizer.id_to_token(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(token)
            types.append(
                (CONTROL if added[i].get("special") else USER_DEFINED) if i in added else NORMAL
            )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    unk = tokenizer.token_to_id(model.get("unk_token") or "")
    ids = dict(bos=tokenizer.bos_id, eos=tokenizer.eos_id, pad=tokenizer.pad_id, unk=unk)
    special = {k: i for k, i in ids.items() if i is not None}
    probe = tokenizer.encode("a")
    add_bos = bool(probe) and probe[0] == tokenizer.bos_id and tokenizer.bos_id is not None
    style = read_style_file(checkpoint_dir)
    template = tokenizer.chat_template
    if style is not None and style != CHAT_TEMPLATE:
        template = jinja_template(style)
    return GGUFVocab(tokens, types, merges, pre, special, add_bos, template)


def meta_tensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """What `read_safetensors` yields, in the same order, as tensors on the meta device."""
    import torch

    from lifecycle_cli.zoo.convert import SAFETENSORS_DTYPES, safetensors_header

    for path in files:
        with open(path, "rb") as f:
            header, _ = safetensors_header(path, f)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = getattr(torch, SAFETENSORS_DTYPES.get(info["dtype"], "float32"))
            yield name, torch.empty(info["shape"], dtype=dtype, device="meta")


def export_gguf(
    checkpoint_dir: Path | str, out_file: Path | str, dtype: str = "f16"
) -> tuple[Path, Config]:
    """Write a checkpoint folder as one GGUF file llama.cpp and Ollama run, tensor by tensor
    (one tensor in memory at a time); 2-D weights in `dtype`, quantized by `gguf.quants`."""
    import gguf
    import numpy as np
    import torch

    from lifecycle_cli.checkpoint import load_config, weight_files
    from lifecycle_cli.rope import llama3_inv_freq
    from lifecycle_cli.zoo import family_for
    from lifecycle_cli.zoo.convert import progress_bar, read_safetensors, remap

    checkpoint_dir, out_file = Path(checkpoint_dir), Path(out_file)
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    config = load_config(checkpoint_dir)
    arch = arch_for(config, checkpoint_dir)
    check_exportable(config, arch, checkpoint_dir)
    vocab = vocab_for_gguf(checkpoint_dir, config)
    table = name_table(arch, config)
    rules = family_for(config.hf_model_type).weight_rules(config)
    files = weight_files(checkpoint_dir)
    weight_type = getattr(gguf.GGMLQuantizationType, EXPORT_DTYPES[dtype][0])
    scaling = config.rope_scaling or {}

    def gguf_tensors(tensors) -> Iterator[tuple[str, torch.Tensor]]:
        experts: dict[str, dict[int, torch.Tensor]] = {}  # llama.cpp stacks a layer's experts
        for hf_name, t in remap(tensors, rules, config, to_ours=False):
            name, t = table[hf_name], to_llama_cpp(hf_name, t.float(), arch, config, to_gguf=True)
            expert = EXPERT.search(hf_name)
            if expert is None:
                yield name, t
                continue
            stack = experts.setdefault(name, {})
            stack[int(expert.group(1))] = t
            if len(stack) == config.n_expert:
                yield name, torch.stack([stack[e] for e in range(config.n_expert)])
                del experts[name]
        if scaling.get("type") == "llama3":  # llama.cpp reads the per-frequency factors
            n = config.rope_n_elem
            inv = 1.0 / (config.rope_base ** (torch.arange(0, n, 2, dtype=torch.float32) / n))
            yield "rope_freqs.weight", inv / llama3_inv_freq(inv, scaling)

    def qtype_of(name: str, shape: tuple[int, ...]):
        q = gguf.GGMLQuantizationType
        if len(shape) == 1 or weight_type == q.F32 or name.endswith(ALWAYS_F32):
            return q.F32
        block = gguf.GGML_QUANT_SIZES[weight_type][0]
        return weight_type if shape[-1] % block == 0 else q.F16  # llama.cpp's fallback

    def encode(t: torch.Tensor, qtype) -> np.ndarray:
        data = t.detach().contiguous().numpy()
        if qtype == gguf.GGMLQuantizationType.F32:
            return data
        if qtype == gguf.GGMLQuantizationType.F16:
            return data.astype(np.float16)
        return gguf.quants.quantize(data, qtype)

    infos = [(name, tuple(t.shape), qtype_of(name, tuple(t.shape))) for name, t in
             gguf_tensors(meta_tensors(files))]  # fmt: skip
    context = config.block_size
    if config.sliding_window and arch.name not in ("gemma2", "gemma3"):
        # llama.cpp attends to the whole context here: within the window that is the same.
        context = min(context, config.sliding_window)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.parent / f".{out_file.name}.partial-{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, arch.name)
    try:
        write_metadata(
            writer, config, arch, vocab, context, EXPORT_DTYPES[dtype][1], checkpoint_dir
        )
        for name, shape, qtype in infos:
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                np_dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
                nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize
                writer.add_tensor_info(name, shape, np.dtype(np_dtype), nbytes)
            else:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
                writer.add_tensor_info(
                    name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype
                )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress_bar(files, f"Writing {out_file.name}") as bar:
            for (_, t), (_, _, qtype) in zip(gguf_tensors(read_safetensors(files)), infos):
                writer.write_tensor_data(encode(t, qtype))
                bar.update(t.numel() * 4)
        writer.close()
        os.replace(tmp, out_file)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_file, config


PHI3_TOKENS = {"</s>", "<unk>", "<s>", "<|endoftext|>"}


def gguf_model_name(name: str, vocab: GGUFVocab) -> str:
    """general.name. llama.cpp sets Phi-3's token attributes when the name says `phi3` or
    `phi-3`, and fails to load a file whose vocabulary lacks those tokens: such a name is
    written as `phi_3`."""
    if re.search("phi-?3", name, flags=re.I) and not PHI3_TOKENS <= set(vocab.tokens):
        return re.sub("phi-?3", "phi_3", name, flags=re.I)
    return name


def write_metadata(w, config: Config, arch: Arch, vocab: GGUFVocab, context: int, file_type: int,
                   source: Path) -> None:  # fmt: skip
    import gguf

    w.add_name(gguf_model_name(config.name or source.name, vocab))
    w.add_context_length(context)
    w.add_embedding_length(config.n_embd)
    w.add_block_count(config.n_layer)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.n_head)
    w.add_head_count_kv(config.n_query_groups)
    w.add_key_length(config.head_size)
    w.add_value_length(config.head_size)
    if arch.rope:
        w.add_rope_dimension_count(config.rope_n_elem)
        w.add_rope_freq_base(config.rope_base)
    if arch.norm == "layernorm":
        w.add_layer_norm_eps(config.norm_eps)
    else:
        w.add_layer_norm_rms_eps(config.norm_eps)
    if arch.name == "gptneox":
        w.add_parallel_residual(config.parallel_residual)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(file_type)
    if config.mlp == "moe":
        w.add_expert_count(config.n_expert)
        w.add_expert_used_count(config.n_expert_per_token)
        if arch.name == "qwen3moe":
            w.add_expert_feed_forward_length(config.expert_intermediate_size)
    scaling = config.rope_scaling or {}
    if scaling.get("type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    elif scaling.get("type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_seq_len"])
        w.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(scaling["beta_slow"])
        if scaling.get("attention_factor") is not None:
            w.add_rope_scaling_yarn_attn_factor(scaling["attention_factor"])
    if config.attention_logit_softcapping is not None:
        w.add_attn_logit_softcapping(config.attention_logit_softcapping)
    if config.final_logit_softcapping is not None:
        w.add_final_logit_softcapping(config.final_logit_softcapping)
    if arch.name in ("gemma2", "gemma3") and config.sliding_window:
        w.add_sliding_window(config.sliding_window)
        w.add_sliding_window_pattern(config.sliding_window_pattern)
        w.add_rope_freq_base_swa(config.rope_local_base or config.rope_base)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for key, token_id in vocab.special.items():
        getattr(w, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "pad": "add_pad_token_id",
                    "unk": "add_unk_token_id"}[key])(token_id)  # fmt: skip
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)
