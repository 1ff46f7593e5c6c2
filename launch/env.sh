# Sourced by the launchers: creates (once) and activates the project's virtual environment in .venv.
# RATPLUS_VENV overrides the location.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${RATPLUS_VENV:-$repo/.venv}
stamp=$venv/.ratplus-installed
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
    echo "==> installing ratplus-mega and its dependencies into $venv (first run: several minutes)"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e "$repo[dev]"
    touch "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
cd "$repo"
