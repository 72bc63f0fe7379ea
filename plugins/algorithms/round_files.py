"""The round files of the on-policy algorithms (``online``): ``rounds/round-<r>.jsonl``, written atomically with
a checksum beside it, and checked when read back, since a rerun trains on exactly the pairs they hold."""

from __future__ import annotations

import json
from pathlib import Path

from prefopt.errors import PrefoptError
from prefopt.integrity import checksum_path, verify_checksum, write_checksum
from prefopt.paths import atomic_write_text


def write_round(path: Path, records: list[dict]) -> None:
    """A round's prompt records as JSON lines, atomically, then the file's checksum."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    write_checksum(path)


def read_round(path: Path, index: int, first_step: int) -> str:
    """The text of round ``index``'s file, checked against its checksum (a file from before checksums were
    kept has none). A damaged round cannot be rebuilt as it was: its samples came from the policy at step
    ``first_step``, which later checkpoints have moved on from."""
    problem = verify_checksum(path) if checksum_path(path).exists() else None
    if problem is None:
        try:
            return path.read_text()
        except UnicodeDecodeError:
            problem = "not UTF-8 text"
    raise PrefoptError(
        f"{path} is damaged ({problem}); to sample round {index} again, delete it and every checkpoint after "
        f"step {first_step}, or use a new output.dir"
    )
