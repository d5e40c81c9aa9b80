"""`--quantize int8|int4`: quantized linear layers stay within their format's error of the float
layer, loading quantized shrinks the weights in memory and leaves the checkpoint on disk as it
was. (`serve --quantize int8`: test_serve_cli.py serves the quantized model.)"""

from __future__ import annotations

import pytest
import torch
from served import tiny_checkpoint

from lifecycle_cli import LLM
from lifecycle_cli.checkpoint import iter_tensors, weight_files
from lifecycle_cli.generate.quantized import GROUP_SIZE, Int4Linear, Int8Linear


def weight_error_bound(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Half a quantization step per weight, per output channel (int8, 254 steps across ±max)
    or per group of inputs (int4, 15 steps from min to max), plus the bfloat16 rounding of the
    scales and zero points (relative 2**-8 of the largest weight they cover)."""
    if fmt == "int8":
        top = w.abs().amax(1, keepdim=True)
        return (top / 127 / 2 + top * 2**-8).expand_as(w)
    g = w.view(w.size(0), -1, GROUP_SIZE)
    step = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15
    top = g.abs().amax(-1, keepdim=True)
    return (step / 2 + top * 2**-8).expand_as(g).reshape(w.shape)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_linear_is_within_its_formats_error_of_the_float_layer(fmt):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96)
    x = torch.randn(3, 5, 128)
    q = (Int8Linear if fmt == "int8" else Int4Linear)(linear)
    w = linear.weight.detach()
    bound = weight_error_bound(w, fmt)
    # The stored weight: within half a step (and the bfloat16 rounding of its scales).
    err = (q.dequantized() - w).abs()
    assert bool((err <= bound + w.abs() * 2**-8).all()), (err / bound).max()
    assert float(err.mean()) > 0.1 * float(bound.mean())  # it did round the weights
    # The product: the weight error times |x|, plus the bfloat16 rounding of the activations.
    with torch.no_grad():
        exact, y = linear(x), q(x)
    assert y.shape == exact.shape and y.dtype == exact.dtype
    limit = x.abs() @ bound.t() + 2**-7 * (x.abs() @ w.abs().t()) + 1e-5
    assert bool(((y - exact).abs() <= limit).all())
    # ... and far less than the bound for random errors on average.
    assert float((y - exact).abs().mean()) < 0.5 * float(limit.mean())


def test_the_heads_most_likely_tokens_are_not_left_to_bfloat16_rounding():
    """The kernel's bfloat16 output has a resolution of 1/8 at logits near 30: close logits tie
    or swap. The head's top outputs are the int8 weights times the float32 input, exactly."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 512, bias=False)
    x = torch.randn(6, 64) * 40  # logits of tens, as a trained model's
    plain, head = Int8Linear(linear), Int8Linear(linear, exact_top=8)
    with torch.no_grad():
        reference = x @ head.dequantized().t()  # the same int8 weights, float32 arithmetic
        y_plain, y = plain(x), head(x)
    top = reference.topk(4, dim=-1).indices  # well inside the 8 recomputed
    assert torch.allclose(y.gather(1, top), reference.gather(1, top), rtol=0, atol=1e-4)
    assert torch.equal(y.argmax(-1), reference.argmax(-1))
    assert float((y_plain - reference).gather(1, top).abs().max()) > 1e-2  # bfloat16 alone
    assert torch.allclose(y, y_plain, atol=0.5)  # the rest: the kernel's own output


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 2 layers, width 32, 400 tokens: every layer fits the int4 kernels (multiples of 16).
    return tiny_checkpoint(tmp_path_factory.mktemp("quantized") / "ckpt", logit_scale=20)


def test_loading_quantized_shrinks_the_weights_and_leaves_the_checkpoint_alone(checkpoint):
    on_disk = {k: v.clone() for k, v in iter_tensors(weight_files(checkpoint))}
    # int8: 1 byte per weight and a 2-byte scale per row of 32 or 64; int4: half a byte and
    # 4 bytes per group of 32. Of 4 bytes per float32 weight.
    for fmt in ("int8", "int4"):
        llm = LLM.load(checkpoint, quantize=fmt)
        before, after = llm.weight_bytes
        model = llm.model
        packed = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
        assert len(packed) == 2 * 5 + 1  # qkv, proj and 3 SwiGLU layers per block; the head
        for m in packed:
            ratio = 0.28 if isinstance(m, Int8Linear) else 0.16
            stored = sum(b.numel() * b.element_size() for b in m.buffers())
            assert stored < ratio * m.in_features * m.out_features * 4
        assert after < 0.6 * before
        assert isinstance(model.blocks[0].attn.qkv, Int8Linear if fmt == "int8" else Int4Linear)
        assert isinstance(model.lm_head, Int8Linear)  # the head is int8 in both modes
        assert model.wte.weight.dtype == torch.float32  # the embedding and norms stay float32
        assert llm.generate("The class", max_new_tokens=4, temperature=0)  # it decodes
    after = dict(iter_tensors(weight_files(checkpoint)))
    assert all(torch.equal(on_disk[k], after[k]) for k in on_disk)
