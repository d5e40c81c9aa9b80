"""The one training loop shared by pretrain, finetune and align, and what it needs around it."""
