"""`llmcycle evaluate`: tasks that measure a checkpoint.

spec.py             --tasks parsed into task specs (no torch)
args.py             Settings, --judge.* and --lm_eval.* (no torch)
runner.py           load each checkpoint, run its tasks, write results, print the table
results.py          Metric, TaskResult, results.json / samples.jsonl, the table
records.py          task files read with file:line errors
loglik.py           the one batched log-likelihood pass over our GPT
perplexity.py       perplexity:FILE       sliding-window NLL, perplexity, bits per byte
multiple_choice.py  multiple_choice:FILE  acc, acc_norm, few-shot
exact_match.py      exact_match:FILE and synthetic:NAME, by greedy generation (finetune's
                    exact match too)
harness.py          lm_eval:TASK through our implementation of lm-eval's LM
judge.py            judge:FILE, an OpenAI-compatible judge: scores or pairwise win rates
preference_task.py  preference:FILE, wiring to preference.py (align's scoring)
"""
