"""Which folders prefopt wrote: a marker file in each output folder, so prefopt never deletes or replaces one
it did not write.

A run directory, its ``model/`` and every checkpoint carry ``.prefopt`` (``{"written_by": "prefopt", "kind":
...}``), written when the folder is made. Before replacing ``model/`` or rotating a checkpoint out, prefopt
asks for the marker: a folder without it (the user's own files, a model copied in by hand, or a checkpoint
written by a prefopt older than the marker) is left alone, with a one-line error where leaving it would
lose the run's output.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefopt.paths import atomic_write_json

MARKER_NAME = ".prefopt"

__all__ = ["MARKER_NAME", "is_marked", "write_marker"]


def write_marker(folder: Path, kind: str) -> None:
    """Mark ``folder`` as prefopt's output of ``kind`` ("run", "model", "checkpoint")."""
    atomic_write_json(Path(folder) / MARKER_NAME, {"written_by": "prefopt", "kind": kind})


def is_marked(folder: Path, kind: str) -> bool:
    """Whether ``folder`` carries prefopt's marker for ``kind``."""
    try:
        marker = json.loads((Path(folder) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("written_by") == "prefopt" and marker.get("kind") == kind
