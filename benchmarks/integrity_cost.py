"""What checking cached files before use costs: the quickstart's reference cache and task data, verified
against their sha256 sums, next to the time the run's setup takes.

Every run verifies the reference cache (``<key>.safetensors.sha256``) and the task's built data
(``MANIFEST.json``) before reading them, so the check is paid by every run. This script runs ``setup`` of
``recipes/dpo/quickstart.yaml`` (in a temporary output.dir, on the user's prefopt cache) once to make sure every
cache exists with its sums (the first time ever, that builds them: minutes), then ``--repeats`` more times,
timed. Each timed setup already includes the checks; they are then timed alone, ``--repeats`` times each, and
reported as a share of the median setup.

    python benchmarks/integrity_cost.py                 # writes benchmarks/results/integrity_cost.json
    python benchmarks/integrity_cost.py --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import provenance  # benchmarks/provenance.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "dpo" / "quickstart.yaml"
RESULT = ROOT / "benchmarks" / "results" / "integrity_cost.json"


def timed_setup(out_dir: Path):
    """``setup`` of the quickstart into ``out_dir``: (seconds, the run)."""
    from prefopt.engine import setup
    from prefopt.recipe import load_recipe

    recipe = load_recipe(str(QUICKSTART), [f"output.dir={out_dir}", "output.trackers=[]"])
    started = time.perf_counter()
    run = setup(recipe, show_progress=False)
    return time.perf_counter() - started, run


def cached_files(run) -> tuple[list[Path], Path]:
    """The run's reference cache files and its task data folder."""
    caches = [Path(c["path"]) for c in run.summary["reference"].get("caches", [])]
    return caches, Path(run.task_data.train).parent


def median_seconds(check, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        problems = check()
        times.append(time.perf_counter() - started)
        assert not problems, problems
    return statistics.median(times)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(repeats: int) -> dict:
    from prefopt.integrity import verify_checksum, verify_manifest

    with tempfile.TemporaryDirectory(prefix="integrity-cost-") as tmp:
        first, run = timed_setup(Path(tmp) / "warm-up")  # builds whatever cache is missing or has no sums yet
        caches, task_folder = cached_files(run)
        del run
        gc.collect()
        setups = []
        for k in range(repeats):
            seconds, run = timed_setup(Path(tmp) / f"run-{k}")
            setups.append(seconds)
            del run
            gc.collect()
    reference = median_seconds(lambda: [p for p in map(verify_checksum, caches) if p], repeats)
    task = median_seconds(lambda: verify_manifest(task_folder), repeats)
    setup_median = statistics.median(setups)
    return {
        "setup_seconds": {"warm_up": round(first, 3), "timed": [round(s, 3) for s in setups],
                          "median": round(setup_median, 3)},
        "reference_cache": {"files": [str(p) for p in caches], "bytes": sum(p.stat().st_size for p in caches),
                            "verify_seconds_median": round(reference, 5)},
        "task_data": {"folder": str(task_folder), "bytes": folder_bytes(task_folder),
                      "verify_seconds_median": round(task, 5)},
        "verify_share_of_setup": round((reference + task) / setup_median, 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed setups, and timed checks of each kind")
    parser.add_argument("--json", type=Path, default=RESULT, help=f"where to write the result (default {RESULT})")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # other work on the machine slows setup more than the checks (which are disk reads and hashing)
    result = provenance.start()
    result.update(measure(args.repeats))
    provenance.finish(result, args.json)
    share = result["verify_share_of_setup"]
    print(f"setup {result['setup_seconds']['median']:.2f} s (median); verifying the reference cache "
          f"{result['reference_cache']['verify_seconds_median'] * 1000:.1f} ms and the task data "
          f"{result['task_data']['verify_seconds_median'] * 1000:.1f} ms: {share:.2%} of setup -> {args.json}")


if __name__ == "__main__":
    main()
