"""Run an `llmcycle` verb in this process with probes (used by tests as a subprocess script, so
that Fabric's launcher re-runs this script for the other ranks, probes included):

- PROBE_COUNT_BLOCKS=1 prints `block forwards: N` at exit: how often a transformer block's
  forward ran (more with activation checkpointing, which recomputes blocks in backward);
- PROBE_COMPILE_BACKEND=aot_eager makes `--compile` trace and run the model through dynamo and
  AOT autograd without inductor's C++ build (minutes on a small CPU), and prints
  `compiled: <class>` for each module the verb compiles.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys

import torch

from lifecycle_cli import model
from lifecycle_cli.cli import main

calls = 0
block_forward = model.Block.forward


def counting_forward(self, *args, **kwargs):
    global calls
    calls += 1
    return block_forward(self, *args, **kwargs)


def compile_with(backend: str):
    compile = functools.partial(torch.compile, backend=backend)

    def probe(module, *args, **kwargs):
        print(f"compiled: {type(module).__name__}", flush=True)
        return compile(module, *args, **kwargs)

    return probe


if __name__ == "__main__":
    if os.environ.get("PROBE_COUNT_BLOCKS"):  # a counter in the blocks would defeat dynamo
        model.Block.forward = counting_forward
        atexit.register(lambda: print(f"block forwards: {calls}", flush=True))
    if backend := os.environ.get("PROBE_COMPILE_BACKEND"):
        torch.compile = compile_with(backend)
    sys.exit(main(sys.argv[1:]))
