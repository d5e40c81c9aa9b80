"""Data curation and compute planning: mixtures, dedup, quality filters, contamination, plans.

`plan` (the `--dry_run` figures: parameters, FLOPs, Chinchilla sizes, memory, time and cost),
`mixture` (several sources sampled by weight), `dedup` and `filters` (applied while the token
shards are prepared), `contamination` (evaluation examples found in a training corpus).
Nothing here imports torch at import time: the verbs' --help reads `PlanArgs`.
"""
