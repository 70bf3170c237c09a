"""`tools/install_env.sh` (what `make demo` / `make test` run first) fails early and says why."""
import os
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "install_env.sh"


def _run(venv, **env):
    full_env = dict(os.environ, VENV=str(venv), **env)
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=120
    )


def test_too_little_disk_space_stops_before_creating_the_environment(tmp_path):
    venv = tmp_path / "envs" / "venv"
    # No disk has a million GiB free: the check must refuse, name the path and the need.
    result = _run(venv, INSTALL_NEED_GIB="1000000")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "GiB free" in result.stderr and str(venv) in result.stderr
    assert "1000000 GiB" in result.stderr
    assert not venv.exists()


def _fake_venv(tmp_path, pip_exit):
    """A venv whose python has torch and whose pip fails like a full disk does."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then\n'
        '  echo "WARNING: Location noise"\n'
        '  echo "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device" >&2\n'
        f"  exit {pip_exit}\n"
        "fi\n"
        "exit 0\n"
    )
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return venv


def test_pip_failure_stops_the_install_with_pips_message(tmp_path):
    # torch "imports", so the disk check is skipped even with an impossible need.
    result = _run(_fake_venv(tmp_path, pip_exit=1), INSTALL_NEED_GIB="1000000")
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert "No space left on device" in out
    assert "'pip install -q" not in out and "'pip install --upgrade pip' failed (exit 1)" in out
    assert "WARNING: Location" not in out
    # It stopped at the first failing pip call: the lock file was never attempted.
    assert "requirements/lock.txt" not in out


def test_successful_pip_calls_run_to_the_end(tmp_path):
    result = _run(_fake_venv(tmp_path, pip_exit=0))
    # pip "succeeds" (its filtered warning is not an error), so the script finishes cleanly.
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error:" not in result.stderr


def test_corruption_package_goes_in_without_its_declared_opencv(tmp_path):
    # The fake python logs each pip call: the no-deps file must come after the lock file and
    # with --no-deps, or imagecorruptions-imaug's `opencv-python` would sit next to the headless cv2.
    venv = _fake_venv(tmp_path, pip_exit=0)
    python = venv / "bin" / "python"
    log = tmp_path / "pip_calls"
    python.write_text(python.read_text().replace("then\n", f'then\n  echo "$*" >> {log}\n', 1))
    result = _run(venv)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text().splitlines()
    lock = next(i for i, c in enumerate(calls) if "requirements/lock.txt" in c)
    nodeps = next(i for i, c in enumerate(calls) if "requirements/no-deps.txt" in c)
    assert lock < nodeps and "--no-deps" in calls[nodeps].split()
    pinned = (REPO / "requirements" / "no-deps.txt").read_text()
    assert "imagecorruptions-imaug==" in pinned
    lock_text = (REPO / "requirements" / "lock.txt").read_text()
    assert "opencv-python==" not in lock_text and "numba==" in lock_text
