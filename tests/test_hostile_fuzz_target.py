"""The atheris target ``fuzz/fuzz_api.py``: replayed on random bytes, and run briefly under
atheris when installed."""

import os
import re

import numpy as np
import pytest
from hostile import COUNTS

import fastemb


# --------------------------------------------------------------------------------------------
# The atheris target (fuzz/fuzz_api.py): replayed on random bytes, and run under atheris
# --------------------------------------------------------------------------------------------

FUZZ_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz")


def _fuzz_target():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fuzz_api",
                                                  os.path.join(FUZZ_DIR, "fuzz_api.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_target_on_random_inputs(tmp_path):
    """The atheris target's checks, without atheris: 3,000 random byte strings (each decoded
    into a call with hostile arguments) raise no Finding and crash nothing."""
    target = _fuzz_target()
    rng = np.random.default_rng(12345)
    for number in range(3000):
        data = rng.bytes(int(rng.integers(0, 512)))
        try:
            target.run_one(data, fastemb, str(tmp_path))
        except target.Finding as finding:
            raise AssertionError(f"input {number} ({data.hex()}): {finding}") from finding
    COUNTS["atheris target, random bytes", "matched"] += 3000


def test_fuzz_target_reports_a_contract_violation(monkeypatch, tmp_path):
    """Control: the target turns an undocumented exception into a finding."""
    target = _fuzz_target()

    def broken(*args, **kwargs):
        raise KeyError("broken")

    monkeypatch.setattr(fastemb, "embedding", broken)
    monkeypatch.setattr(fastemb, "embedding_bag", broken)
    monkeypatch.setattr(fastemb, "embedding_backward", broken)
    monkeypatch.setattr(fastemb, "embedding_bag_backward", broken)
    with pytest.raises(KeyError):
        for seed in range(200):  # the first functional input
            target.run_one(np.random.default_rng(seed).bytes(64), fastemb, str(tmp_path))


def test_atheris_fuzzes_the_api_briefly(tmp_path):
    """A short libFuzzer run of fuzz/fuzz_api.py (coverage-guided); any crash, hang or finding
    fails it. Longer runs: ``python fuzz/fuzz_api.py -max_total_time=600``."""
    pytest.importorskip("atheris")
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(os.path.abspath(fastemb.__file__))),
        os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-W", "ignore", os.path.join(FUZZ_DIR, "fuzz_api.py"), "-runs=6000",
         "-max_total_time=20", "-timeout=20", "-rss_limit_mb=4096", "-seed=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr, result.stderr[-3000:]
    runs = re.search(r"Done (\d+) runs", result.stderr)
    COUNTS["atheris run", "matched"] += int(runs.group(1)) if runs else 0
