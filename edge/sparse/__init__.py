"""R-Sparse activation sparsity for the native engine: SVD cache, calibration, allocation
search, profile files, a fused CPU decode kernel, and sparse perplexity."""

from __future__ import annotations
