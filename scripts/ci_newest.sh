#!/usr/bin/env bash
# CI, second step: prefopt as a user gets it, with the newest releases that pyproject.toml's ranges allow.
#
# Builds the wheel, installs it (not editable) with the test extra into a fresh virtual environment WITHOUT
# requirements/lock.txt, lists the wheel's files and the resolved versions, and runs a smoke subset of the
# tests against the installed wheel: training a tiny model (also with gradient checkpointing), loss parity
# with TRL, a resume, tokenization, the embedded model's download logic and tests/test_packaging.py. The tests run from a copy of the checkout
# without its package folders, so `import prefopt` can only find the wheel (checked before pytest starts).
# torch stays at 2.13.0: the newest torch on PyPI for Linux is a CUDA build, and the README installs the CPU
# one first. A newer release that breaks something fails here; fix the code, or bound the range in
# pyproject.toml with the reason. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
work="$(mktemp -d "${TMPDIR:-/tmp}/prefopt-ci-newest.XXXXXX")"
trap 'echo "== removing $work"; rm -rf "$work"' EXIT
started=$SECONDS
step() { echo "== $1 ($((SECONDS - started)) s)"; }
pip_install() { python -m pip install --quiet --disable-pip-version-check "$@"; }

step "fresh environment in $work/venv"
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
pip_install --upgrade "pip>=24"
echo "torch==2.13.0" >"$work/torch.txt"  # a constraint for every install below: no other torch may come in
pip_install -c "$work/torch.txt" "torch==2.13.0"

step "building the wheel"
# From a copy of what the wheel is made of: building writes build/ and *.egg-info beside pyproject.toml.
mkdir "$work/source"
git ls-files -co --exclude-standard -- pyproject.toml README.md LICENSE prefopt plugins recipes \
  | tar -cf - -T - | tar -xf - -C "$work/source"
python -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$work/dist" "$work/source"
wheel="$(ls "$work"/dist/prefopt-*.whl)"
step "the wheel's files: $(basename "$wheel")"
python -m zipfile -l "$wheel"

step "installing the wheel with [test], newest releases"
pip_install -c "$work/torch.txt" "${wheel}[test]"
step "resolved versions"
python -m pip list --format=freeze --disable-pip-version-check

step "smoke tests against the installed wheel"
mkdir "$work/checkout"
git ls-files -co --exclude-standard | grep -v -e '^prefopt/' -e '^plugins/' | tar -cf - -T - | tar -xf - -C "$work/checkout"
cd "$work/checkout"
python - <<'PY'
import sysconfig
from pathlib import Path

import prefopt

where = Path(prefopt.__file__).resolve()
assert where.is_relative_to(Path(sysconfig.get_paths()["purelib"]).resolve()), f"prefopt imported from {where}"
print(f"prefopt imported from {where.parent}")
PY
# The -W: transformers 5.24 deprecated gradient_checkpointing_enable; prefopt must call the new name there.
PREFOPT_TEST_WHEEL="$wheel" PREFOPT_SOURCE_ROOT="$repo" python -m pytest -p no:cacheprovider \
  -W 'error:`gradient_checkpointing_enable` is deprecated:FutureWarning' \
  tests/test_packaging.py \
  tests/test_embedded.py \
  tests/test_engine.py::test_training_raises_held_out_margin_and_accuracy \
  tests/test_engine.py::test_gradient_checkpointing_gives_the_same_update \
  "tests/faults/test_torn_metrics.py::test_a_run_whose_metrics_end_in_a_torn_line_resumes_and_reads_like_one_run" \
  tests/losses/test_dpo.py \
  tests/data/test_tokenize.py \
  "$@"
step "passed"
