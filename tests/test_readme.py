"""The README's quick start runs as written."""

import re
from pathlib import Path


def test_readme_quick_start_runs():
    src = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", src, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})


def test_readme_test_command_is_ci_and_prints_the_count_line():
    """`.ci/run` runs exactly the README's test command, and pytest's options leave its `N passed` line on
    (`-q` there plus `-q` in addopts would be `-qq`, which prints no summary)."""
    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    cmd = re.search(r"^(python3 -m pip install torch==2\.13\.0 -e \"\.\[test\]\" && python3 -m pytest.*)$", readme,
                    re.M).group(1)
    ci = [ln for ln in (root / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith(("#", "set", "cd"))]
    assert ci == [cmd]
    addopts = re.findall(r"^addopts\s*=\s*(.*)$", (root / "pyproject.toml").read_text(), re.M)
    quiet = cmd.split().count("-q") + sum(a.count("-q") for a in addopts)
    assert quiet <= 1, (cmd, addopts)
