"""`--tensor_parallel`: FSDP2 x tensor parallel on CPU (gloo) trains as one process does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from in_process import llmcycle_here
from test_pretrain import TINY, corpus, llmcycle, losses, wait_for, weights, write_config  # noqa: F401

from lifecycle_cli.config import Config
from lifecycle_cli.errors import UserError

# GQA attention (4 query heads, 2 key/value heads), a dense SwiGLU layer, then a mixture of
# experts: every tensor-parallel plan in one tiny model.
MIXED = dict(TINY, mlp="moe", n_expert=4, n_expert_per_token=2, expert_intermediate_size=128,
             dense_layers=[0])  # fmt: skip
ARGS = dict(max_steps=4, save_interval=2, keep_last=None)


def config_file(tmp_path, corpus, name):  # noqa: F811
    path = write_config(tmp_path / f"{name}.yaml", corpus, tmp_path / name, **ARGS)
    config = yaml.safe_load(path.read_text())
    config["model_config"] = MIXED
    path.write_text(yaml.safe_dump(config))
    return path


def test_tensor_parallel_and_2d_match_one_process_and_resume_after_sigkill(corpus, tmp_path):  # noqa: F811
    single = config_file(tmp_path, corpus, "single")
    assert llmcycle_here("pretrain", "--config", single) == 0

    tp = config_file(tmp_path, corpus, "tp")
    proc = llmcycle("pretrain", "--config", str(tp), "--devices", "2", "--tensor_parallel", "2",
                    cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 device(s) (1 data-parallel x 2 tensor-parallel)" in proc.stdout

    # 2 data-parallel x 2 tensor-parallel, every process killed after step 2's folder.
    out = tmp_path / "2d"
    flags = ["pretrain", "--config", str(config_file(tmp_path, corpus, "2d")), "--devices", "4",
             "--tensor_parallel", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "lifecycle_cli", *flags], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)  # fmt: skip
    wait_for(lambda: (out / "step-000002").exists(), run)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not (out / "final").exists(), "the run finished before it could be killed"
    proc = llmcycle(*flags, "--resume", "auto", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at step 2" in proc.stdout

    expected = losses(tmp_path / "single")
    assert sorted(expected) == [1, 2, 3, 4]
    for name in ("tp", "2d"):
        got = losses(tmp_path / name)
        assert sorted(got) == sorted(expected), name
        for step, loss in expected.items():
            assert abs(got[step] - loss) <= 1e-5, (name, step, got[step], loss)
    # final/ is a plain checkpoint in the 1-process layout (attn.qkv stacked again). Adam's
    # update of a near-zero gradient amplifies the reduction order's rounding: measured up to
    # 4e-5 on a handful of the ~300K weights after 4 steps.
    a = weights(tmp_path / "single" / "final")
    for name in ("tp", "2d"):
        b = weights(tmp_path / name / "final")
        assert a.keys() == b.keys(), name
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), name
    # Sharded step folders: one shard file per rank.
    assert len(list((out / "step-000002" / "train_state").glob("*.distcp"))) == 4


@pytest.mark.parametrize(
    "fields, tp, message",
    [
        (dict(n_head=4, n_query_groups=2), 4, "n_query_groups (key/value heads) 2 does not"),
        (dict(n_head=6, n_query_groups=6), 4, "n_head 6 does not divide by 4"),
        (dict(n_head=4, intermediate_size=90), 4, "intermediate_size 90 does not divide by 4"),
        (dict(n_head=4, qk_norm=True, qk_norm_scope="all"), 2, "qk_norm_scope all"),
    ],
)
def test_heads_that_do_not_split_are_refused_in_one_line(fields, tp, message):
    from lifecycle_cli.train.tensor_parallel import check_tensor_parallel

    config = Config(n_layer=1, n_embd=48, **{"intermediate_size": 96, **fields})
    with pytest.raises(UserError) as refused:
        check_tensor_parallel(config, tp)
    assert message in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "devices, strategy, message",
    [
        (3, "fsdp", "--tensor_parallel 2 does not divide the 3 device(s)"),
        (2, "ddp", "--tensor_parallel applies to --strategy fsdp"),
    ],
)
def test_impossible_layouts_are_refused_before_any_process_starts(devices, strategy, message):
    from lifecycle_cli.train.fabric import setup_fabric

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        setup_fabric(devices, 1, strategy, "32-true", tensor_parallel=2)
