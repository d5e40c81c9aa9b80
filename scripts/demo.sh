#!/usr/bin/env bash
# The model's life as far as it exists today; `make demo` runs it with the venv's llmcycle on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

llmcycle --help
llmcycle download list
