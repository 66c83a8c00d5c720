"""Evaluation: `benchmark` (view families of real photos, their cache, category retrieval),
`metrics` (revisitop mAP, P@k, recall@k, paired bootstrap), `evaluate` (what `remap eval`
runs: EvalOptions, run, format_table)."""
