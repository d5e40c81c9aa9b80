import sys
from pathlib import Path

import torch

# Tests import shared helpers (hf_models.py) from this folder.
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)
