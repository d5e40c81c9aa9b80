#!/usr/bin/env bash
# The model's life as far as it exists today, on a laptop CPU in about 10 minutes:
# pretrain a tiny model on text that ships with Python, finetune it on synthetic tasks whose
# answers are checked exactly, then generate from both. `make demo` runs it with the venv's
# llmcycle on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== 1. pretrain (config_hub/pretrain/tiny.yaml): loss curve in out/pretrain/tiny/loss.png"
llmcycle pretrain --config config_hub/pretrain/tiny.yaml

echo "== 2. generate from the pretrained model"
llmcycle generate out/pretrain/tiny/final --prompt "The return statement" \
  --max_new_tokens 40 --temperature 0.7 --seed 1

echo "== 3. finetune on synthetic tasks (reverse, sort, upper, add): exact match on held-out prompts"
llmcycle finetune out/pretrain/tiny/final --config config_hub/finetune/synthetic-full.yaml

echo "== 4. generate from the finetuned model"
for prompt in "reverse: d o g" "sort: t b x a" "upper: c a t" "add: 1 2 + 3 0"; do
  printf '%s ->' "$prompt"
  llmcycle generate out/finetune/synthetic-full/final --prompt "$prompt" \
    --max_new_tokens 12 --temperature 0 2>/dev/null
  echo
done
