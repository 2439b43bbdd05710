"""The skip guard of tests/conftest.py: under MMCL_STRICT_SKIPS (as .ci/run runs the suite) a skip
that is not in ALLOWED_SKIPS fails the run; without it the run passes and `-rs` says why it skipped."""

import os
import subprocess
import sys

from tests.conftest import REPO


def test_a_skip_outside_the_allow_list_fails_a_strict_run(tmp_path):
    (tmp_path / "test_planted.py").write_text("import pytest\n\ndef test_gone():\n    pytest.skip('no browser')\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "tests.conftest", "-p", "no:cacheprovider",
           "--rootdir", str(tmp_path), str(tmp_path / "test_planted.py")]
    relaxed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "MMCL_STRICT_SKIPS"})
    assert relaxed.returncode == 0 and "SKIPPED" in relaxed.stdout and "no browser" in relaxed.stdout
    strict = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, MMCL_STRICT_SKIPS="1"))
    assert strict.returncode == 1, strict.stdout
    assert "skipped outside tests/conftest.py ALLOWED_SKIPS" in strict.stdout and "test_gone" in strict.stdout
