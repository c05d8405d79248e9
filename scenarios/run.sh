#!/usr/bin/env bash
# One command for the scenario suite: installs its tools, builds tidegate, runs the full
# scenarios, prints the tables and writes the plots to scenarios/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v haproxy >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends haproxy >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r scenarios/requirements.txt
cargo build --release --locked
python3 scenarios/run.py --tidegate target/release/tidegate "$@"
