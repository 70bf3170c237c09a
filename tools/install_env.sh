#!/usr/bin/env bash
# Create .venv with CPython 3.10 and install the pinned stack (requirements/lock.txt) plus this
# project in editable mode. Used by `make install`; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

find_python310() {
  if command -v python3.10 >/dev/null 2>&1 && python3.10 -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
    command -v python3.10; return
  fi
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.10(\.|$)' | sort -rV); do
      if PYENV_VERSION=$v python3.10 -c 'import sys' 2>/dev/null; then
        PYENV_VERSION=$v pyenv which python3.10; return
      fi
    done
    for p in "$(pyenv root)"/versions/3.10*/bin/python3.10; do
      [ -x "$p" ] && { echo "$p"; return; }
    done
  fi
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python310) || {
    echo "error: CPython 3.10 not found. Install it (e.g. 'pyenv install 3.10.13') or put python3.10 on PATH;" >&2
    echo "       sal-detectron2==0.7.2 is a CPython 3.10 wheel. To use your own detectron2 build, see README 'Own detectron2'." >&2
    exit 1
  }
  echo "Creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q -r requirements/lock.txt 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import detectron2, torch, upsnet_robust; from detectron2 import _C; print('detectron2', detectron2.__version__, '| torch', torch.__version__, '| upsnet_robust OK')"
