"""Data for the training verbs.

- `args`: the `--data.*` flags (no torch, so `--help` stays fast).
- Pretraining text: `text.prepare` over `corpus` (the text bundled with Python), `readers` (files
  and the documents in them) and `shards` (the cached token files, served as `TokenBlocks`).
- Finetuning: `instruct` (Alpaca and chat records -> `SFTDataset`), `classify` (labelled texts
  -> `ClassificationDataset`), `synthetic` (built-in tasks with exactly checkable answers), on
  `records` (reading JSON/JSONL files) and `packed` (the token store under both datasets).
- `order`: the seeded sample order every dataset shares, so a data position is one integer.
"""
