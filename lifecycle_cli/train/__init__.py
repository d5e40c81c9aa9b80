"""Training: one session (`session.py`) runs a task (`tasks/`: pretraining, instruction
finetuning, classification) through the one loop (`loop.py`), with Fabric, resume state and
logging beside it."""
