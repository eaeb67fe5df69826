"""The README's Python examples run and their assertions hold; its two commands are the ones
CI and users run (.ci/run runs both, as written, in a fresh clone)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples may write files
    namespace = {}
    blocks = code_blocks("python")
    assert len(blocks) >= 7
    for number, block in enumerate(blocks):
        if "import torch" in block:
            pytest.importorskip("torch")
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)


def test_commands_install_and_run_the_main_job_and_the_tests():
    text = README.read_text()
    main = re.search(r"<!-- main-command -->\n```bash\n(.*?)\n```", text).group(1)
    tests = re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```", text).group(1)
    assert "pip install" in main and main.endswith("python -m fastemb train --data ml-100k")
    assert "pip install" in tests and "pytest" in tests
