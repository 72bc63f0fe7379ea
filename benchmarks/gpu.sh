#!/usr/bin/env bash
# The GPU speed test, on a GPU machine with no network, from a copy of this repository with .whl/ beside it
# (packed here by benchmarks/gpu_wheels.sh):
#   1. checks that .whl/'s wheels were packed for this machine's Python (one line and exit 1 if not);
#   2. installs them into a separate folder ($SITE, put first on PYTHONPATH) with
#      `pip install --no-index --no-deps`: the image's own packages, torch above all, are left as they are;
#   3. installs prefopt from this tree: `pip install --no-deps --no-build-isolation -e .` (if that fails, the
#      wheel gpu_wheels.sh built, and says so: the source digest line of the report tells whether it is this code);
#   4. prints every requirement of prefopt, TRL, datasets, transformers and peft the installed set does not meet,
#      and the GPU (nvidia-smi);
#   5. runs `benchmarks/gpu_dpo.py --json $OUT/gpu_dpo.json` under `timeout 480`, its output copied to
#      $OUT/gpu_dpo.txt; arguments given to this script are passed on to it.
#
#   bash benchmarks/gpu.sh                          # OUT defaults to runs/gpu/
#   bash benchmarks/gpu.sh --configs prefopt-padded,trl
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/runs/gpu}"
SITE="${SITE:-/tmp/prefopt-site}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

say() { echo "gpu.sh: $*"; }
fail() { echo "gpu.sh: $*" >&2; exit 1; }

# 1. the wheels' Python against this one
[ -f .whl/manifest.json ] \
  || fail "no .whl/manifest.json: run 'bash benchmarks/gpu_wheels.sh' where PyPI is reachable and carry .whl"
here="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
packed="$("$PY" -c 'import json; print(json.load(open(".whl/manifest.json"))["target_python"])')"
[ "$here" = "$packed" ] || fail "the wheels in .whl are for Python $packed but $PY here is Python $here: run \
'GPU_PYTHON=$here bash benchmarks/gpu_wheels.sh' and carry .whl again"
torch_before="$("$PY" -c 'import torch; print(torch.__version__)')" || fail "$PY has no torch"

# 2. the wheels, beside the image's packages
say "installing $(ls .whl/*.whl | wc -l) wheels into $SITE (torch $torch_before is not touched) ..."
rm -rf "$SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# 3. prefopt from this tree
say "installing prefopt from this tree (editable, no dependencies, no build isolation) ..."
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
  say "the editable install failed; installing .whl/prefopt/'s wheel instead (the code as gpu_wheels.sh packed it)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/prefopt/*.whl
fi
torch_after="$("$PY" -c 'import torch; print(torch.__version__)')"
[ "$torch_after" = "$torch_before" ] || fail "torch changed from $torch_before to $torch_after: stopping"
"$PY" -c 'import prefopt, prefopt_plugins; from prefopt.registry.loading import default_plugins; default_plugins()' \
  || fail "prefopt does not import with the installed packages (see the traceback above)"

# 4. what the installed set does not meet, and the GPU
"$PY" - <<'EOF'
import importlib.metadata as metadata

from packaging.requirements import Requirement

unmet = []
for dist in ("prefopt", "trl", "datasets", "transformers", "peft", "pydantic", "accelerate"):
    try:
        requires = metadata.distribution(dist).requires or []
    except metadata.PackageNotFoundError:
        unmet.append(f"{dist} is not installed")
        continue
    for text in requires:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            have = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{dist} needs {requirement}: not installed")
            continue
        if not requirement.specifier.contains(have, prereleases=True):
            unmet.append(f"{dist} needs {requirement}: {have} here")
print("gpu.sh: requirements " + ("all met" if not unmet else "not met (runs anyway):\n  " + "\n  ".join(unmet)))
EOF
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit,temperature.gpu,utilization.gpu \
    --format=csv || say "nvidia-smi failed"
else
  say "nvidia-smi not found"
fi

# 5. the benchmark
say "running benchmarks/gpu_dpo.py $* (stopped after 480 s) ..."
set +e
timeout 480 "$PY" benchmarks/gpu_dpo.py --json "$OUT/gpu_dpo.json" "$@" 2>&1 | tee "$OUT/gpu_dpo.txt"
status="${PIPESTATUS[0]}"
set -e
[ "$status" != 124 ] || say "stopped by 'timeout 480': $OUT/gpu_dpo.json holds the configurations that finished"
say "exit status $status; output in $OUT/gpu_dpo.txt and $OUT/gpu_dpo.json"
exit "$status"
