"""`llmcycle` in the test's own process (no Python + torch start-up), computing bit for bit as
the CLI in a subprocess with OMP_NUM_THREADS=1 does: one intra-op thread while it runs."""

from __future__ import annotations

import torch

from lifecycle_cli.cli import main


def llmcycle_here(*argv: str) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
