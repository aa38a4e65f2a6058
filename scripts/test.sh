#!/usr/bin/env bash
# Install everything the tests need into ./.venv and run the test-suite under Xvfb.
# Usage: bash scripts/test.sh [pytest args...]     (e.g. -m "not slow" for a quick run)
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian/Ubuntu packages for a virtual display with OpenGL (napari's canvas needs GL).
if ! command -v xvfb-run >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO bash scripts/install-system-deps.sh
fi

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The reference implementation (test oracle) needs torchvision, which pins its torch.
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q -e ".[testing]"

# Headless GL through Mesa's software rasteriser; napari's own viewer tests need no real screen.
export QT_API=pyqt6
xvfb-run -a -s "-screen 0 1280x1024x24" "$VENV/bin/python" -m pytest "$@"
