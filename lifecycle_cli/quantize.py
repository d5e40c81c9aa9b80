"""4-bit NF4 base weights for QLoRA, through bitsandbytes.

`quantize_blocks` turns every plain `nn.Linear` in the transformer blocks into a `Linear4bit`
whose weight is packed into NF4 with double-quantized scales; embeddings, norms, the head and a
mixture's router stay in the compute dtype. Quantize before anything wraps those layers: LoRA
(`lora.py`) then adapts a `Linear4bit` as it adapts any linear layer, by running the layer's own
`forward` on its weight. `dequantize_blocks` unpacks every packed weight (whatever layer holds it)
so that adapters merge into an ordinary checkpoint.

Packing is deterministic: the same base weights give the same packed bytes, which is what lets a
QLoRA run resume from a step folder (the base is quantized again from the original checkpoint
and the packed tensors in the folder load onto it exactly).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from lifecycle_cli.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

    from lifecycle_cli.model import GPT

QUANT_TYPE = "nf4"


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(
            "--method qlora needs bitsandbytes: pip install 'llmcycle[qlora]'"
        ) from None
    return bitsandbytes


def is_4bit(weight) -> bool:
    return getattr(weight, "quant_state", None) is not None


def linear(x: Tensor, weight, bias) -> Tensor:
    """F.linear for a plain or a packed 4-bit weight (so a layer stays right once unpacked)."""
    import torch.nn.functional as F

    if not is_4bit(weight):
        return F.linear(x, weight, bias)
    import bitsandbytes as bnb

    out = bnb.matmul_4bit(x, weight.t(), quant_state=weight.quant_state)
    return out if bias is None else out + bias


@functools.cache
def _frozen_linear_4bit() -> type:
    from torch import nn

    class Linear4bit(nn.Linear):
        """A frozen linear layer with a packed 4-bit weight (same state-dict names)."""

        def __init__(self, base: nn.Linear, weight) -> None:
            super().__init__(base.in_features, base.out_features, base.bias is not None, "meta")
            self.weight, self.bias = weight, base.bias

        def forward(self, x):
            return linear(x, self.weight, self.bias)

    Linear4bit.__module__, Linear4bit.__qualname__ = __name__, "Linear4bit"
    return Linear4bit


def quantize_blocks(model: GPT, device=None) -> None:
    """Pack the blocks' linear weights to 4 bits in place, moving them to `device` (default:
    where they are). Call it before `inject_lora` (which then adapts the packed layers) and
    before Fabric wraps the model."""
    bnb = require_bitsandbytes()
    from torch import nn

    from lifecycle_cli.linear import Linear

    Linear4bit = _frozen_linear_4bit()
    for i, block in enumerate(model.blocks):
        router = getattr(block.mlp, "gate", None)  # a mixture's router stays unquantized
        for name, module in list(block.named_modules(prefix=f"blocks.{i}")):
            if not isinstance(module, nn.Linear) or module is router:
                continue
            if type(module) not in (nn.Linear, Linear):
                raise ValueError(
                    f"{name} is a {type(module).__name__}: quantize_blocks packs plain "
                    "nn.Linear layers; quantize before wrapping them (e.g. before inject_lora)"
                )
            w = module.weight
            packed = bnb.nn.Params4bit(
                w.data, requires_grad=False, quant_type=QUANT_TYPE, compress_statistics=True
            ).to(device or w.device)
            model.set_submodule(name, Linear4bit(module, packed))


def dequantize_blocks(model: GPT) -> None:
    """Unpack every 4-bit weight to the dtype it was quantized from; the frozen 4-bit layers
    become plain nn.Linear again."""
    import bitsandbytes as bnb
    from torch import nn

    from lifecycle_cli.linear import Linear

    Linear4bit = _frozen_linear_4bit()
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) and is_4bit(module.weight)):
            continue
        w = module.weight
        module.weight = nn.Parameter(
            bnb.functional.dequantize_4bit(w.data, w.quant_state), requires_grad=False
        )
        if type(module) is Linear4bit:
            plain = Linear(module.in_features, module.out_features, module.bias is not None,
                           device="meta")  # fmt: skip
            plain.weight, plain.bias = module.weight, module.bias
            model.set_submodule(name, plain)
