#!/usr/bin/env bash
# Runs the fault, hostile-input, exhaustion, token and leak suites and writes the figures they print
# (`figures:` lines) into README.md between the reliability markers. Nothing is typed by hand.
#   bash tests/reliability-figures.sh            # full run (token churn 30 s)
#   SIDEKEY_CHURN_SECS=6 bash tests/reliability-figures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cargo test --locked --test faults --test hostile --test exhaustion --test token --test secrets -- --nocapture --test-threads=1 2>&1 | tee "$out" | grep -E '(test result|figures:)' || true
if grep -q 'test result: FAILED' "$out"; then
  echo "some tests failed; README not updated" >&2
  exit 1
fi
{
  echo "<!-- figures:begin (written by tests/reliability-figures.sh on $(date -u +%Y-%m-%d), $(nproc) cores, $(git rev-parse --short HEAD)) -->"
  echo '```'
  grep -o 'figures: .*' "$out" | sed 's/^figures: //'
  echo '```'
  echo '<!-- figures:end -->'
} > "$out.block"
python3 - "$out.block" <<'PY'
import re, sys
block = open(sys.argv[1]).read().rstrip("\n")
readme = open("README.md").read()
pattern = re.compile(r"<!-- figures:begin.*?<!-- figures:end -->", re.S)
if not pattern.search(readme):
    sys.exit("README.md has no figures markers")
open("README.md", "w").write(pattern.sub(lambda _: block, readme))
PY
rm -f "$out.block"
echo "README.md reliability figures updated"
