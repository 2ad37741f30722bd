"""`make test` (what CI runs) lints with ruff before the suite, and a finding fails it."""
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _make_test_commands() -> list[str]:
    """The commands of the Makefile's test target, install excluded (make -n prints them without running them)."""
    # --no-print-directory: under `make test` itself (CI) the nested make would print "make[1]: Entering ..."
    out = subprocess.run(["make", "--no-print-directory", "-n", "-o", "install", "test", f"PYTHON={sys.executable}"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_runs_ruff_first_and_a_finding_fails_it(tmp_path):
    commands = _make_test_commands()
    assert commands[0] == f"{sys.executable} -m ruff check ." and "pytest" in commands[-1]
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")  # the project's rule set
    (tmp_path / "clean.py").write_text("import os\n\nprint(os.sep)\n")
    lint = shlex.split(commands[0])
    ok = subprocess.run(lint, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (tmp_path / "bad.py").write_text("import os\n\ntry:\n    pass\nexcept Exception:\n    pass\n")
    bad = subprocess.run(lint, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "F401" in bad.stdout and "--> bad.py:1:8" in bad.stdout, bad.stdout  # the unused import
    assert "BLE001" in bad.stdout and "--> bad.py:5:8" in bad.stdout, bad.stdout  # the blind except
