"""The one training session and loop: what every training verb shares (flags, hparams.yaml,
clipping, weight decay), tested once below the verbs."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.nn as nn

from lifecycle_cli.commands.finetune import finetune
from lifecycle_cli.commands.pretrain import pretrain
from lifecycle_cli.model import GPT, RMSNorm
from lifecycle_cli.train.args import EvalArgs, TrainArgs
from lifecycle_cli.train.fabric import make_optimizer
from lifecycle_cli.train.logs import read_metrics
from lifecycle_cli.train.session import RunFlags
from lifecycle_cli.zoo import named_config

VERBS = [pretrain, finetune]
RUN_FLAGS = [f.name for f in dataclasses.fields(RunFlags)]


def help_of(verb) -> dict[str, str]:
    from docstring_parser import parse

    return {p.arg_name: p.description for p in parse(verb.__doc__).params}


def test_every_training_verb_has_the_run_flags_with_the_same_help():
    for verb in VERBS:
        params = inspect.signature(verb).parameters
        assert set(RUN_FLAGS) <= set(params), verb.__name__
        assert all(help_of(verb).get(name) for name in params), verb.__name__  # all described
    for name in RUN_FLAGS:
        defaults = {repr(inspect.signature(v).parameters[name].default) for v in VERBS}
        annotations = {str(inspect.signature(v).parameters[name].annotation) for v in VERBS}
        assert len({help_of(v)[name] for v in VERBS}) == 1, name
        assert len(defaults) == 1 and len(annotations) == 1, name


def test_no_weight_decay_on_norms_biases_and_embeddings():
    """With zero gradients AdamW's step is its decoupled decay alone: decayed weights shrink by
    (1 - lr * weight_decay), the others stay as they were."""
    config = named_config(
        "gpt2", n_layer=1, n_embd=32, n_head=4, vocab_size=64, block_size=16,
        intermediate_size=64, tie_embeddings=False,
    )  # fmt: skip
    model = GPT(config)
    assert config.position_embedding == "learned" and config.bias  # wpe and biases present
    no_decay = set()
    for prefix, module in model.named_modules():
        for name, _ in module.named_parameters(prefix=prefix, recurse=False):
            if isinstance(module, (nn.Embedding, nn.LayerNorm, RMSNorm)) or name.endswith("bias"):
                no_decay.add(name)
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} <= no_decay
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, lr=0.1, weight_decay=0.5, betas=(0.9, 0.95), fused=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, param in model.named_parameters():
        factor = 1.0 if name in no_decay else 1 - 0.1 * 0.5
        torch.testing.assert_close(param.detach(), before[name] * factor, msg=name)


class Ones:
    """TrainData of identical samples: rows of ones, (B, 4) token-block shaped."""

    def __len__(self) -> int:
        return 64

    def get(self, indices):
        return torch.ones(len(indices), 4)


@pytest.mark.parametrize("max_norm", [0.5, None])
def test_gradient_norm_is_clipped_to_max_norm(max_norm, tmp_path):
    """One SGD step of lr 1 moves the weights by exactly the (clipped) gradient; metrics.csv
    logs the norm before clipping."""
    import lightning as L

    from lifecycle_cli.train.loop import Run, fit
    from lifecycle_cli.train.state import Progress

    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = nn.Linear(3, 1, bias=False)
    nn.init.zeros_(model.weight)
    model = fabric.setup(model)
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=1.0))
    train = TrainArgs(
        global_batch_size=4, micro_batch_size=4, max_steps=1, lr=1.0, min_lr=1.0,
        lr_schedule="constant", max_norm=max_norm, save_interval=None,
    )  # fmt: skip
    run = Run(
        objective=lambda m, batch: 100 * m(batch[:, :3]).sum(),  # gradient 400 * (1, 1, 1)
        train_data=Ones(), val_data=Ones(), train=train,
        eval=EvalArgs(interval=None, final_validation=False), out_dir=tmp_path, max_steps=1,
        flops_per_token=1.0,
    )  # fmt: skip
    fit(fabric, model, optimizer, run, Progress())
    full_norm = 400 * 3**0.5
    moved = model.weight.detach().norm().item()
    assert moved == pytest.approx(max_norm or full_norm, rel=1e-5)
    logged = read_metrics(tmp_path / "metrics.csv")[0]["grad_norm"]
    if max_norm is not None:
        assert float(logged) == pytest.approx(full_norm, rel=1e-5)
