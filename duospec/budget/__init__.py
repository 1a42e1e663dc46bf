"""Draft budgets from measured costs (DESIGN.md 1.1), not guesses: one module per job.

model.py        the cost model: a pass-cost curve, expected tokens of a round, the best draft length
policy.py       the policy protocol every budget implements, DraftBudget, and the chain budget GammaPolicy
tree.py         SpecExec's node budget (TreeBudgetPolicy), acceptance measured by budget
duo.py          DuoDecoding's round planner (DuoPlanner), drafting beside the target
timing.py       the one timing harness: a pass over n tokens after a filled context, and the measurements built on it
load.py         whether a measurement ran under visible load (then it is not kept)
kept.py         measured costs kept on disk per model and machine, spot-checked when read
corrections.py  spot checks of kept figures, and the online correction from real pass times
"""
