#!/usr/bin/env bash
# Create .venv with CPython 3.10 and install the pinned stack (requirements/lock.txt, then
# requirements/no-deps.txt without dependencies) plus this project in editable mode. Used by
# `make install`; safe to re-run.
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

# The pinned torch wheel brings its CUDA libraries: a fresh environment takes about 6 GiB. Say so
# before pip fills the disk half-way (skipped once torch is installed there).
NEED_GIB=${INSTALL_NEED_GIB:-7}
if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; }; then
  mkdir -p "$(dirname "$VENV")"
  free_kib=$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print $4}')
  if [ -n "$free_kib" ] && [ "$free_kib" -lt $((NEED_GIB * 1024 * 1024)) ]; then
    echo "error: $((free_kib / 1024 / 1024)) GiB free on the disk that would hold $VENV; installing the pinned" >&2
    echo "       stack needs about $NEED_GIB GiB (torch with its CUDA libraries). Free some space, or set VENV" >&2
    echo "       to a directory on a larger disk (INSTALL_NEED_GIB=N changes the GiB this check asks for)." >&2
    exit 1
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python310) || {
    echo "error: CPython 3.10 not found. Install it (e.g. 'pyenv install 3.10.13') or put python3.10 on PATH;" >&2
    echo "       sal-detectron2==0.7.2 is a CPython 3.10 wheel. To use your own detectron2 build, see README 'Own detectron2'." >&2
    exit 1
  }
  echo "Creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
# pip's own failure (e.g. a full disk) stops the install with its message, instead of surfacing
# later as a missing module.
pip_install() {
  local rc=0
  # with pipefail (set above) the pipeline's status is pip's: the filter always succeeds
  "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; } || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "error: 'pip install $*' failed (exit $rc) while installing into $VENV; see pip's message above." >&2
    exit "$rc"
  fi
}

pip_install --upgrade pip
pip_install -r requirements/lock.txt
# Packages whose declared dependencies would bring a second cv2 (opencv-python): their real needs
# are in the lock file, so they go in without their declared ones.
pip_install --no-deps -r requirements/no-deps.txt
pip_install --no-deps -e .
"$VENV/bin/python" -c "import detectron2, torch, upsnet_robust, imagecorruptions; from detectron2 import _C; print('detectron2', detectron2.__version__, '| torch', torch.__version__, '| upsnet_robust OK')"
