"""Built data in the task's cache: found and checked before reuse, or built whole in a private folder and put
in place, one builder at a time.

A build folder holds ``train.jsonl``, ``eval.jsonl``, ``eval_prompts.jsonl``, ``task.json`` and, written last,
``MANIFEST.json`` (their sha256 sums, ``prefopt.integrity``): its presence marks a finished build, and its sums
are checked before every reuse, so a damaged build (a flipped bit, a file cut short or gone) is built again,
never read. A build from before manifests (``task.json``, then written last, but no ``MANIFEST.json``) is
complete: its sums are recorded when it is first found, so damage from then on is caught.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

from prefopt.integrity import MANIFEST_NAME, verify_manifest, write_manifest
from prefopt.locks import build_lock
from prefopt.paths import replace_dir, staging_dir

from prefopt_plugins.tasks.sentiment.pairs import TASK_FILE

log = logging.getLogger(__package__)


def find_or_build(out_dir: Path, build_into: Callable[[Path], None]) -> None:
    """Make ``out_dir`` a whole build: reuse it when its sums agree, else call ``build_into`` on a private
    folder and put that in its place. Another process building the same data is waited for, then reused."""
    with build_lock(out_dir, log.warning):
        if reusable(out_dir):
            return
        staging = staging_dir(out_dir, "building")
        try:
            build_into(staging)
            write_manifest(staging)  # last: it marks the build finished
            replace_dir(staging, out_dir)  # a damaged build is replaced whole
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def reusable(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a whole build; a damaged one is reported."""
    if (out_dir / MANIFEST_NAME).is_file():
        problems = verify_manifest(out_dir)
        if not problems:
            return True
        log.warning("sentiment task data %s is damaged (%s); rebuilding", out_dir, "; ".join(problems))
        return False
    if (out_dir / TASK_FILE).is_file():
        write_manifest(out_dir)
        log.info("recorded the sha256 sums of the task data in %s, built before sums were kept", out_dir)
        return True
    return False
