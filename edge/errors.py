"""The EdgeError family: every failure a user can fix, with a message that says how.

Library code raises these; `edge.cli` turns them into one line on stderr and exit code 2.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base class. `str(err)` is the whole user-facing message (one line)."""

    exit_code = 2


class ModelNotFoundError(EdgeError):
    """MODEL is neither a file nor a catalog name."""


class InvalidModelFileError(EdgeError):
    """The file exists but is not a usable GGUF (wrong magic, truncated, corrupt)."""


class CatalogError(EdgeError):
    """The catalog is missing, malformed, or lacks the requested entry."""


class DownloadError(EdgeError):
    """A pull failed: network, checksum, disk."""


class ContextOverflowError(EdgeError):
    """The prompt does not fit in the context window."""


class BadOptionError(EdgeError):
    """An option value that click's own types could not reject."""


class OutputExistsError(EdgeError):
    """Refusing to overwrite an existing file without --force."""


class ConversionError(EdgeError):
    """A Hugging Face checkpoint edge cannot convert (missing files, unsupported layout)."""


class SuiteError(EdgeError):
    """A bias suite is missing, empty, or has rows that cannot be read."""


class SparseProfileError(EdgeError):
    """A sparsity profile or its calibration input is unusable (wrong model, too short, corrupt)."""


class HostCheckError(EdgeError):
    """The installed llama.cpp crashed in its test inference on this host (e.g. SIGILL)."""


class InsufficientMemoryError(EdgeError):
    """The memory model says a model (at this context) would swap or not fit in RAM."""
