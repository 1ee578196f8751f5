"""CRISPR (Yang et al., ACL 2024): find the units that drive biased answers and prune them.

attribution.py holds the scores, prune.py the pruning and the search for n, calibrate.py the
CC / DC baselines, scoring.py the option scoring on BBQ, pipeline.py the steps and the
``lmsmith debias attribute | prune | eval | run`` commands, cli.py what they print.
"""
