"""Importance matrices (llama.cpp's imatrix) for `edge quantize --imatrix`.

An importance matrix holds, for every weight matrix, the mean of x² per input channel over
a calibration text: the quantizer then spends its rounding error where the activations
are small. `collect` gathers one through llama.cpp's graph callback, as llama-imatrix
does; `files` reads and writes llama.cpp's formats and builds the array its quantizer takes.
"""

from __future__ import annotations

from edge.imatrix.collect import ImatrixResult, collect_imatrix
from edge.imatrix.files import Imatrix, ImatrixError, QuantizeImatrix, read_imatrix, write_imatrix

__all__ = ["Imatrix", "ImatrixError", "ImatrixResult", "QuantizeImatrix", "collect_imatrix", "read_imatrix",
           "write_imatrix"]
