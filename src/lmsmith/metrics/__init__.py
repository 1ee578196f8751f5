"""Metrics: rouge.py (ROUGE-L), qa.py (SQuAD EM/F1), bias.py (BBQ), retrieval.py (R@k, MRR)."""
