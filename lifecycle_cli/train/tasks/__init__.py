"""Training tasks the session runs: what to learn and what final/ holds.

`pretrain` (next-token loss on text), `sft` (instructions, masked response loss, exact match),
`classify` (a class head, accuracy). The last two start from a checkpoint through
`from_checkpoint.CheckpointTask` (full, LoRA or QLoRA weights, merged at the end), which is also
where a preference task (a frozen reference model beside the trained one) will start.
"""
