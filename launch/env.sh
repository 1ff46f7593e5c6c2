# Sourced by the launchers: creates (once) and activates the project's virtual environment in .venv.
# RATPLUS_VENV overrides the location.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${RATPLUS_VENV:-$repo/.venv}
stamp=$venv/.ratplus-installed
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
    echo "==> installing ratplus-mega and its dependencies into $venv (first run: several minutes)"
    log=$(mktemp)
    if ! { python3 -m venv "$venv" && "$venv/bin/python" -m pip install --upgrade pip \
           && "$venv/bin/python" -m pip install -e "$repo[dev]"; } >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" | tail -n 40 >&2
        echo "==> installation failed; the full log is $log" >&2
        exit 1
    fi
    rm -f "$log"
    touch "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
cd "$repo"
