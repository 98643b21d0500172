# shellcheck shell=bash disable=SC2034  # sourced: VENV is used by the caller
# Sourced by the launch and test scripts: make sure ./.venv has this checkout installed with the
# given extras, re-installing only when setup.py changed since the last install.
# Usage: ensure_venv EXTRAS   (e.g. ensure_venv "" or ensure_venv "[test]")
ensure_venv() {
  local extras="$1"
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  local venv="${UNIALIGNMENT_VENV:-$root/.venv}"
  local stamp="$venv/.installed${extras}" s
  if [ -z "$extras" ]; then  # an install with extras (tests/run.sh: [test]) serves a plain one too
    for s in "$venv"/.installed*; do
      if [ -f "$s" ] && [ ! "$root/setup.py" -nt "$s" ]; then stamp="$s"; fi
    done
  fi
  if [ ! -x "$venv/bin/python" ]; then
    "${UNIALIGNMENT_PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
  fi
  if [ ! -f "$stamp" ] || [ "$root/setup.py" -nt "$stamp" ]; then
    echo "installing unialignment_jax${extras} into $venv ..." >&2
    "$venv/bin/pip" install --quiet -e "$root${extras}"
    touch "$stamp"
  fi
  VENV="$venv"
}
