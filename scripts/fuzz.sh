#!/usr/bin/env bash
# The fuzz targets of crates/outboxd-postgres/fuzz (cargo fuzz, nightly): the pgoutput decoder
# with outboxd's message decoder (`pgoutput`), and the replication stream's state machine
# (`stream`). Each runs for the given time from the corpus in the repository; what it finds
# new is kept in a scratch directory, crashes in crates/outboxd-postgres/fuzz/artifacts.
#
#   scripts/fuzz.sh            each target for 10 minutes
#   scripts/fuzz.sh 60         each target for 60 seconds (CI runs 30)
#
# Installs what is missing (the nightly toolchain, cargo-fuzz).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_fuzz_tools
fuzz_bounded "${1:-600}"
