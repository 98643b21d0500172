#!/usr/bin/env bash
# The test suite, as the README and CI run it: installs the package with its test extras into
# ./.venv (first run: about 2 minutes), then runs pytest. Extra arguments go to pytest.
#   bash tests/run.sh            # everything
#   bash tests/run.sh -k parity  # a subset
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/_venv.sh
source "$root/launch/_venv.sh"
ensure_venv "[test]"
cd "$root"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "$@" tests
