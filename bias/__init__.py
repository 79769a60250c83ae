"""Fairness audits and bias correction for edge (see issue 6)."""
