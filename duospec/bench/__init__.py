"""Spec-Bench harness: baselines in the same run, reports and plots (`duospec bench`, `duospec profile`).

data.py       questions (packaged Spec-Bench or the user's file), tasks, validation
methods.py    what can be benchmarked: duospec's method registry plus the baselines
baselines.py  transformers' assisted and prompt-lookup generation, measured like our methods
runner.py     the interleaved, resumable loop writing results.jsonl
ties.py       near-tie explanation of a greedy answer that differs from ar's
report.py     summary.json, report.md and plots, computed from results.jsonl alone
profile.py    the target's cost per pass over n tokens and the draft's per token
"""
