"""The README's examples (issue 20 §9): every ```python block runs as it is on a CPU in a fresh folder and prints
what its `# →` comments show (the text after the arrow, up to a ": " that starts an explanation)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS = re.findall(r"^```python\n(.*?)^```$", open(os.path.join(ROOT, "README.md")).read(), re.M | re.S)


def expected_lines(block: str) -> list:
    return [re.split(r": (?=\S)", arrow.strip(), maxsplit=1)[0] for arrow in re.findall(r"# → (.*)$", block, re.M)]


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 4 and all(expected_lines(block) for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_readme_python_block_runs_and_prints_what_it_shows(tmp_path, index):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in expected_lines(BLOCKS[index]):
        assert line in result.stdout, (line, result.stdout)
    assert os.listdir(tmp_path) == [], "an example writes nothing"
