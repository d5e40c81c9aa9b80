"""`--precision` and `--device` of `llmcycle generate` and `llmcycle chat`, seen from outside:
the precision is the dtype the model decodes in (the output is what the Python API gives in that
dtype; 32-true by default on CPU), the device is where it runs, and a bad value of either is one
line naming it, exit code 2."""

from __future__ import annotations

import pytest
import torch
from served import assert_one_line_exit_2, llmcycle, tiny_checkpoint

from lifecycle_cli import LLM

PROMPT = "The class"
N = 24
DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # Logits near 64, where bf16 and fp16 round differently from fp32 and from each other: each
    # precision picks its own greedy tokens.
    folder = tmp_path_factory.mktemp("precision") / "ckpt"
    return tiny_checkpoint(folder, context=64, logit_offset=64)


@pytest.fixture(scope="module")
def expected(checkpoint) -> dict[str, str]:
    """precision -> the greedy completion the Python API gives on CPU in that dtype."""
    out = {}
    for name, dtype in DTYPES.items():
        llm = LLM.load(checkpoint, dtype=dtype)
        out[name] = llm.generate(PROMPT, max_new_tokens=N, temperature=0)
    return out


def greedy(verb: str, checkpoint, *flags: str):
    args = ["--prompt", PROMPT] if verb == "generate" else []
    # chat reads the message from stdin (one message, then end of input: the session ends).
    return llmcycle(verb, checkpoint, *args, "--max_new_tokens", N, "--temperature", 0, *flags,
                    input=f"{PROMPT}\n")  # fmt: skip


def completion(verb: str, proc) -> str:
    assert proc.returncode == 0, proc.stderr
    if verb == "generate":
        return proc.stdout.removesuffix("\n")
    # chat's plain style (no template in this checkpoint) gives the model the message as it is.
    return proc.stdout.split(">> Reply: ", 1)[1].split("\n>> Prompt: ", 1)[0]


def test_the_precisions_give_different_tokens_on_this_model(expected):
    assert len(set(expected.values())) == len(DTYPES)  # so the tests below can tell them apart


@pytest.mark.parametrize("precision", DTYPES)
def test_generate_decodes_in_the_precision_asked_for(checkpoint, expected, precision):
    flags = ["--device", "cpu", "--precision", precision]
    text = completion("generate", greedy("generate", checkpoint, *flags))
    assert text == expected[precision]


def test_chat_decodes_in_the_precision_asked_for(checkpoint, expected):
    proc = greedy("chat", checkpoint, "--device", "cpu", "--precision", "bf16-true")
    assert completion("chat", proc) == expected["bf16-true"]
    assert "Time for inference:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_device_cuda_decodes_on_the_gpu(checkpoint, verb):
    llm = LLM.load(checkpoint, device="cuda", dtype=torch.bfloat16)
    want = llm.generate(PROMPT, max_new_tokens=N, temperature=0)
    proc = greedy(verb, checkpoint, "--device", "cuda", "--precision", "bf16-true")
    assert completion(verb, proc) == want
    # The default on a GPU that has bf16: the GPU, in bf16.
    assert completion(verb, greedy(verb, checkpoint)) == want


BAD = [
    (["--precision", "8-bit"], ("precision", "'8-bit'", "bf16-true")),
    (["--device", "tpu"], ("device", "'tpu'")),
    (["--device", "cuda:99"], ("device", "'cuda:99'")),  # no such GPU, or no GPU at all
]


@pytest.mark.parametrize("flags, words", BAD, ids=["precision", "device", "missing-gpu"])
def test_a_bad_precision_or_device_is_one_line_exit_2(checkpoint, flags, words):
    assert_one_line_exit_2(greedy("generate", checkpoint, *flags), *words)
    if flags[0] == "--precision":  # chat reads the same flags the same way
        assert_one_line_exit_2(greedy("chat", checkpoint, *flags), *words)


@pytest.mark.parametrize("verb", ["generate", "finetune"])
def test_compile_without_a_cpp_compiler_is_one_line(checkpoint, tmp_path, verb):
    """On a CPU, torch.compile builds C++: with no compiler to be found ($CXX names none), the
    verb says so in one line (training: before its first step, writing nothing)."""
    out = tmp_path / "run"
    flags = {"generate": ["--prompt", PROMPT],
             "finetune": ["--data.synthetic", "reverse", "--out_dir", out]}[verb]  # fmt: skip
    proc = llmcycle(verb, checkpoint, *flags, "--compile", "true", env={"CXX": "no-such-c++"})
    assert_one_line_exit_2(proc, "--compile", "C++ compiler")
    assert not out.exists()
