"""LoRA: low-rank adapters injected into the one `GPT`'s linear layers, merged back when done.

A chosen `nn.Linear` becomes a `LoRALinear` holding the same weight and bias (same state-dict
names) plus `lora_A` (r, in) and `lora_B` (out, r): y = W x + b + (alpha / r) B A dropout(x)
(alpha / sqrt(r) with `rslora`).
The fused `attn.qkv` gets one rank-r adapter per enabled part, as if queries, keys and values
were separate layers (what LitGPT and PEFT train): `lora_A` stacks their A ((r * parts, in)),
`lora_B` holds B rows for the enabled output rows only; disabled rows cost nothing.

The token embedding matrix (vocab, dim) can get one too: W + (alpha / r) B A with B (vocab, r)
and A (r, dim). When the output head shares that matrix (tie_embeddings) it shares the adapter as
well, so the merged model stays tied. A small pretrained model needs this to learn new outputs:
its tied embeddings hold what each token means both as input and as prediction, and on the tiny
config adapting every linear layer (even at full rank) stalls where training the embeddings too
does not.

A `LoRALinear` wraps any linear layer through one small interface: it holds the base layer's
weight and bias and computes the base output with the base layer's own class `forward` on them.
So a 4-bit packed layer from `quantize.py` (quantize first, then inject) is adapted exactly like
a plain `nn.Linear`, and neither module knows the other.

The options (`LoRAArgs`, the `--lora.*` flags) are defined here, beside the layers; the layer
classes are built on first use (`LoRALinear` resolves lazily), so importing this module costs no
torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import lifecycle_cli
from lifecycle_cli.errors import UserError

# Annotations name the model through the package (`lifecycle_cli.model.GPT`), not a
# TYPE_CHECKING import: jsonargparse runs a flag dataclass's module's TYPE_CHECKING block when it
# reads LoRAArgs, and `llmcycle finetune --help` must not import torch.
StateDict = dict[str, Any]  # tensors by state-dict name

METADATA_KEY = "lora_args"
LORA_FILE = "lora.safetensors"  # beside final/ in a LoRA run


@dataclasses.dataclass
class LoRAArgs:
    """Low-rank adapters: their size and the layers that get one."""

    r: int = 8
    """Rank of the adapters."""
    alpha: int = 16
    """Scale: the adapter's output is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    rslora: bool = False
    """Rank-stabilised scaling, alpha / sqrt(r): a higher rank then learns as fast as a lower
    one instead of being scaled down (Kalajdzievski 2023)."""
    dropout: float = 0.05
    """Dropout on the adapters' input during training."""
    query: bool = True
    """Adapt the attention queries."""
    key: bool = False
    """Adapt the attention keys."""
    value: bool = True
    """Adapt the attention values."""
    projection: bool = False
    """Adapt the attention output projection."""
    mlp: bool = False
    """Adapt every linear layer of the MLP (of every expert in a mixture of experts)."""
    head: bool = False
    """Adapt the output head (when it shares its weight with the embeddings: --lora.embedding)."""
    embedding: bool = False
    """Adapt the token embeddings (and the output head, when the two share one matrix)."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise UserError(
                f"--lora.r must be >= 1, --lora.alpha > 0 and 0 <= --lora.dropout < 1 "
                f"(got r={self.r}, alpha={self.alpha}, dropout={self.dropout})"
            )

    @property
    def scaling(self) -> float:
        """What the adapters' output B A x is multiplied by."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@functools.cache
def _lora_linear() -> type:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from lifecycle_cli.linear import Linear

    class LoRALinear(nn.Linear):
        """`base`'s weight and bias plus one rank-r adapter per part: `parts` are (start, size)
        ranges of output rows (default: all rows). lora_A stacks the parts' A (r rows each),
        lora_B their B (`size` rows each)."""

        def __init__(self, base: nn.Linear, args: LoRAArgs, parts=None) -> None:
            super().__init__(base.in_features, base.out_features, base.bias is not None, "meta")
            self.weight, self.bias = base.weight, base.bias
            # The base's own matmul on these (same-named) tensors: plain, or e.g. packed 4-bit.
            # A class function, not the base module: Fabric/FSDP swap this layer's parameters.
            self.base_forward = type(base).forward
            self.parts = tuple(parts or [(0, base.out_features)])
            self.r, self.scaling = args.r, args.scaling
            rows = sum(size for _, size in self.parts)
            w = base.weight  # a packed weight is not floating point: adapters in the default
            dtype = w.dtype if w.is_floating_point() else torch.get_default_dtype()
            like = {"device": w.device, "dtype": dtype}
            self.lora_A = nn.Parameter(
                torch.empty(len(self.parts) * args.r, self.in_features, **like)
            )
            self.lora_B = nn.Parameter(torch.zeros(rows, args.r, **like))  # starts as a no-op
            if self.lora_A.device.type != "meta":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and LoRA
            self.lora_dropout = nn.Dropout(args.dropout) if args.dropout else nn.Identity()
            self.train(base.training)  # an eval-mode model stays in eval mode

        def pieces(self):
            """(output rows, A, B) of each part."""
            bs = self.lora_B.split([size for _, size in self.parts])
            rows = [slice(start, start + size) for start, size in self.parts]
            return zip(rows, self.lora_A.split(self.r), bs)

        adapters_on = True  # `adapters_disabled` switches it off

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.base_forward(self, x)
            if not self.adapters_on:
                return y
            ax = F.linear(self.lora_dropout(x), self.lora_A) * self.scaling
            return y + F.linear(ax, self.block_B())

        def block_B(self) -> torch.Tensor:
            """(out_features, parts x r): each part's B in its output rows and its own r
            columns, zeros elsewhere. One matmul then adds every part's delta: slicing y into
            parts and concatenating them back made torch.compile's CPU backward fail on
            changing sequence lengths (a saved slice's stride fixed at the first length)."""
            if len(self.parts) == 1 and self.parts[0] == (0, self.out_features):
                return self.lora_B
            block = self.lora_B.new_zeros(self.out_features, len(self.parts) * self.r)
            for p, (rows, _, b) in enumerate(self.pieces()):
                block[rows, p * self.r : (p + 1) * self.r] = b
            return block

        @torch.no_grad()
        def merged(self) -> nn.Linear:
            """A plain nn.Linear with weight W + scaling * B A on each part's rows (a new
            tensor: W may be shared, e.g. with a live model a state dict came from). A packed
            base must be unpacked first (`quantize.dequantize_blocks`)."""
            weight = self.weight.clone()
            for rows, a, b in self.pieces():
                weight[rows] += (b @ a * self.scaling).to(weight.dtype)
            plain = Linear(self.in_features, self.out_features, self.bias is not None, "meta")
            plain.weight, plain.bias = _like(self.weight, weight), self.bias
            return plain

    LoRALinear.__module__, LoRALinear.__qualname__ = __name__, "LoRALinear"
    return LoRALinear


@functools.cache
def _lora_embedding() -> tuple[type, type]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from lifecycle_cli.linear import Linear

    class LoRAEmbedding(nn.Embedding):
        """`base`'s matrix W (vocab, dim) plus (alpha / r) B A, B (vocab, r), A (r, dim)."""

        def __init__(self, base: nn.Embedding, args: LoRAArgs) -> None:
            super().__init__(base.num_embeddings, base.embedding_dim, device="meta")
            self.weight = base.weight
            self.r, self.scaling = args.r, args.scaling
            like = {"device": base.weight.device, "dtype": base.weight.dtype}
            self.lora_A = nn.Parameter(torch.empty(args.r, self.embedding_dim, **like))
            self.lora_B = nn.Parameter(torch.zeros(self.num_embeddings, args.r, **like))
            if self.lora_A.device.type != "meta":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.train(base.training)

        adapters_on = True

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            if not self.adapters_on:
                return F.embedding(idx, self.weight)
            delta = F.embedding(idx, self.lora_B) @ self.lora_A
            return F.embedding(idx, self.weight) + delta * self.scaling

        @torch.no_grad()
        def merged(self) -> nn.Embedding:
            weight = self.weight + (self.lora_B @ self.lora_A * self.scaling).to(self.weight.dtype)
            plain = nn.Embedding(self.num_embeddings, self.embedding_dim, device="meta")
            plain.weight = _like(self.weight, weight)
            return plain

    class TiedLoRAHead(nn.Linear):
        """An output head tied to a LoRAEmbedding: the same matrix, the same adapter. It owns no
        tensor, so the adapter is saved once, under the embedding's name."""

        def __init__(self, base: nn.Linear, embedding: LoRAEmbedding) -> None:
            super().__init__(base.in_features, base.out_features, base.bias is not None, "meta")
            self.weight, self.bias = base.weight, base.bias
            object.__setattr__(self, "embedding", embedding)  # not a submodule: no second copy
            self.train(base.training)

        @property
        def scaling(self) -> float:
            return self.embedding.scaling

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            e = self.embedding  # read at call time: FSDP swaps the embedding's parameters
            if not e.adapters_on:
                return F.linear(x, self.weight, self.bias)
            delta = F.linear(F.linear(x, e.lora_A), e.lora_B)
            return F.linear(x, self.weight, self.bias) + delta * e.scaling

        def merged(self) -> nn.Linear:  # merge_lora ties it to the merged embedding
            plain = Linear(self.in_features, self.out_features, self.bias is not None, "meta")
            plain.weight, plain.bias = self.weight, self.bias
            return plain

    for cls in (LoRAEmbedding, TiedLoRAHead):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return LoRAEmbedding, TiedLoRAHead


def _like(param, tensor):
    from torch import nn

    return nn.Parameter(tensor, requires_grad=param.requires_grad)


def __getattr__(name: str):  # `lifecycle_cli.lora.LoRALinear`, built (torch imported) on use
    if name == "LoRALinear":
        return _lora_linear()
    if name == "LoRAEmbedding":
        return _lora_embedding()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def inject_lora(model: lifecycle_cli.model.GPT, args: LoRAArgs) -> int:
    """Put adapters on the layers `args` chooses, freeze everything else; the number of
    trainable parameters. Call it before Fabric (or DDP/FSDP) wraps the model."""
    from torch import nn

    if has_lora(model):
        raise UserError("the model already has LoRA adapters")
    config, LoRALinear = model.config, _lora_linear()
    LoRAEmbedding, TiedLoRAHead = _lora_embedding()
    if args.head and config.tie_embeddings:
        raise UserError(
            "--lora.head true: this model's output head shares its weight with the token "
            "embeddings (tie_embeddings); use --lora.embedding true, which adapts that shared "
            "matrix for both"
        )
    q, kv = config.n_head * config.head_size, config.n_query_groups * config.head_size
    spans = {"query": (0, q), "key": (q, kv), "value": (q + kv, kv)}  # rows of attn.qkv
    qkv = [span for part, span in spans.items() if getattr(args, part)]
    targets = {}  # module name -> parts
    for i, block in enumerate(model.blocks):
        if qkv:
            targets[f"blocks.{i}.attn.qkv"] = qkv
        if args.projection:
            targets[f"blocks.{i}.attn.proj"] = None
        if args.mlp:  # every expert's layers; a mixture's router (`mlp.gate`) stays frozen
            router = getattr(block.mlp, "gate", None)  # only a mixture has one
            for name, module in block.mlp.named_modules(prefix=f"blocks.{i}.mlp"):
                if isinstance(module, nn.Linear) and module is not router:
                    targets[name] = None
    if args.head:
        targets["lm_head"] = None
    if not targets and not args.embedding:
        raise UserError("LoRA adapts no layer: enable at least one of --lora.query/key/value/...")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, parts in targets.items():
        model.set_submodule(name, LoRALinear(model.get_submodule(name), args, parts))
    if args.embedding:
        model.wte = LoRAEmbedding(model.wte, args)
        if config.tie_embeddings:
            model.lm_head = TiedLoRAHead(model.lm_head, model.wte)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def has_lora(model) -> bool:
    return bool(_adapted(model))


def _adapted(model) -> dict:
    """The model's adapted modules by name."""
    kinds = (_lora_linear(), *_lora_embedding())
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """Inside the block the model computes as its base, every adapter switched off: the
    reference model of preference tuning, without a second copy of the weights."""
    modules = [m for m in _adapted(model).values() if hasattr(m, "adapters_on")]
    for m in modules:
        m.adapters_on = False
    try:
        yield
    finally:
        for m in modules:
            m.adapters_on = True


def lora_state_dict(model) -> StateDict:
    """The adapter tensors only, by state-dict name (`blocks.0.attn.qkv.lora_A`, ...)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def save_lora(model, path: Path, args: LoRAArgs) -> int:
    """Write the adapters to `path` (safetensors, `args` in its metadata); its size in bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    if not tensors:
        raise UserError("the model has no LoRA adapters to save")
    metadata = {"format": "pt", METADATA_KEY: json.dumps(dataclasses.asdict(args))}
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # a crash never leaves half a file under the real name
    return path.stat().st_size


def read_lora(path: Path) -> tuple[LoRAArgs, StateDict]:
    """The settings and the adapter tensors in a file `save_lora` wrote."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as e:
        raise UserError(f"cannot read LoRA adapters {path}: {e}") from None
    try:
        return LoRAArgs(**json.loads(metadata[METADATA_KEY])), tensors
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: no LoRA settings in its metadata (not from save_lora)") from None


def find_adapter(path: Path | str) -> tuple[Path, Optional[Path]]:
    """(the adapter file, the run's final/ folder if it has one) for a LoRA run folder, its
    final/ folder or its lora.safetensors."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        file = path
    elif (path / LORA_FILE).is_file():
        file = path / LORA_FILE
    elif (path.parent / LORA_FILE).is_file() and (path / "model_config.yaml").is_file():
        file = path.parent / LORA_FILE  # the run's final/
    elif (path / "adapter_config.json").is_file():
        raise UserError(
            f"{path} is a PEFT adapter folder; --adapter takes a LoRA run of llmcycle (its "
            f"folder with {LORA_FILE})"
        )
    else:
        raise UserError(
            f"{path}: no LoRA adapters found (expected a finetune/align --method lora run folder "
            f"holding {LORA_FILE}, its final/ folder, or the file itself)"
        )
    final = file.parent / "final"
    return file, final if (final / "model_config.yaml").is_file() else None


def load_lora(model, path: Path) -> LoRAArgs:
    """Load adapters that `save_lora` wrote; inject them first if the model has none.

    On a mismatch the model is left with (no-op) freshly injected adapters."""
    path = Path(path)
    args, tensors = read_lora(path)
    if not has_lora(model):
        inject_lora(model, args)
    expected = lora_state_dict(model)
    bad = sorted(set(expected) ^ set(tensors))
    bad += sorted(
        k for k in tensors.keys() & expected.keys() if tensors[k].shape != expected[k].shape
    )
    bad += [name for name, m in _adapted(model).items() if m.scaling != args.scaling]
    if bad:
        raise UserError(
            f"{path}: adapters do not fit this model (r={args.r}, alpha={args.alpha}, "
            f"rslora={args.rslora}; "
            f"first mismatch: {bad[0]})"
        )
    model.load_state_dict(tensors, strict=False)
    return args


def merge_lora(model: lifecycle_cli.model.GPT) -> None:
    """Fold every adapter into its base weight and make the layers plain again: the state dict
    then has exactly a plain GPT's keys. Parameters stay as frozen as they were."""
    for name, module in _adapted(model).items():
        model.set_submodule(name, module.merged())
    if model.config.tie_embeddings:
        model.lm_head.weight = model.wte.weight


def adapted_model(config, args: LoRAArgs, state: StateDict) -> lifecycle_cli.model.GPT:
    """A GPT with adapters that holds `state` (a full state dict, adapters included) without
    copying it: how finetune saves and merges what a (possibly sharded) run trained."""
    import torch

    from lifecycle_cli.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    inject_lora(model, args)
    if config.tie_embeddings:
        state = {**state, "lm_head.weight": state["wte.weight"]}
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    return model
