"""Whether a file or folder read back is the one that was written: sha256 sums kept beside what they cover.

Files prefopt reads back (checkpoints, reference caches, task data, stage plans) can be damaged after they
were written whole: a disk error, a copy cut short, a bit flipped in storage. Loading them anyway gives wrong
numbers with no error, so they carry sums, checked before use.

- A folder gets ``MANIFEST.json``, ``{"files": {name: {"sha256", "bytes"}}}`` over its files (names are
  paths relative to the folder, ``/``-separated). It is written last, so its presence also marks the folder
  complete. When it lists every file (``names`` not given), a file it does not list is reported too.
- A single file gets a sidecar ``<name>.sha256`` in ``sha256sum`` format (``sha256sum -c`` checks it),
  written after the file, so a file whose sidecar is missing was either written before sums were kept or
  cut off before its sidecar was written.

Checks return problems as text (one short phrase each) instead of raising: what damage means (rebuild,
fall back to an older checkpoint, stop) is the caller's decision.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from prefopt.paths import atomic_write_json, atomic_write_text

MANIFEST_NAME = "MANIFEST.json"
CHECKSUM_SUFFIX = ".sha256"
_CHUNK = 1 << 22  # 4 MiB reads: hashing speed without holding a large file in memory


def sha256_file(path: Path) -> str:
    """The sha256 of the file's bytes, as 64 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- folders


def write_manifest(folder: Path, names: Iterable[str] | None = None) -> Path:
    """Write ``folder/MANIFEST.json`` atomically over ``names`` (every file under ``folder`` when None).
    Call it after the folder's last file is written: its presence is what marks the folder complete."""
    folder = Path(folder)
    listed = sorted(names) if names is not None else _files_under(folder)
    entries = {}
    for name in listed:
        path = folder / name
        entries[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"files": entries}
    if names is None:
        manifest["whole_folder"] = True  # so a file added later is reported
    target = folder / MANIFEST_NAME
    atomic_write_json(target, manifest)
    return target


def verify_manifest(folder: Path) -> list[str]:
    """What differs between ``folder`` and its manifest, one phrase per problem; empty when it is whole."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return [f"no {MANIFEST_NAME}"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{MANIFEST_NAME} is unreadable ({type(exc).__name__})"]
    problems = []
    for name, expected in sorted(files.items()):
        problem = _file_problem(folder / name, expected.get("sha256"), expected.get("bytes"))
        if problem is not None:
            problems.append(f"{name} {problem}")
    if manifest.get("whole_folder"):
        problems += [f"{name} is not in {MANIFEST_NAME}" for name in _files_under(folder) if name not in files]
    return problems


def _files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` but the manifest, as sorted relative ``/`` paths."""
    found = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(name for name in found if name != MANIFEST_NAME)


# --- single files


def checksum_path(path: Path) -> Path:
    """The sidecar that holds ``path``'s sum: ``<name>.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def write_checksum(path: Path) -> Path:
    """Write ``path``'s sidecar atomically; call it once ``path`` is complete."""
    path = Path(path)
    sidecar = checksum_path(path)
    atomic_write_text(sidecar, f"{sha256_file(path)}  {path.name}\n")  # sha256sum's format
    return sidecar


def verify_checksum(path: Path) -> str | None:
    """What is wrong with ``path`` by its sidecar (a phrase), or None when the sums agree."""
    path = Path(path)
    sidecar = checksum_path(path)
    try:
        expected = sidecar.read_text().split()[0]
    except FileNotFoundError:
        return f"no checksum file {sidecar.name}"
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        return f"checksum file {sidecar.name} is unreadable ({type(exc).__name__})"
    return _file_problem(path, expected, None)


def _file_problem(path: Path, sha256: str | None, size: int | None) -> str | None:
    try:
        actual_size = path.stat().st_size
        if size is not None and actual_size != size:
            return f"has {actual_size} bytes, expected {size}"
        actual = sha256_file(path)
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"is unreadable ({exc.strerror or type(exc).__name__})"
    if actual != sha256:
        return "has a different sha256 than when it was written"
    return None
