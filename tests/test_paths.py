"""edge.paths: atomic writes leave no partial file and give the file the umask's mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edge.paths import atomic_path, atomic_write


@pytest.mark.parametrize("umask, want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_mode_not_the_temp_files(tmp_path: Path, umask: int, want: int) -> None:
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "a.json", "w") as f:
            f.write("{}")
        with atomic_path(tmp_path / "b.gguf") as tmp:
            tmp.write_bytes(b"GGUF")
    finally:
        os.umask(old)
    for name in ("a.json", "b.gguf"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "x.bin") as f:
        f.write(b"half")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
