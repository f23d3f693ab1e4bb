"""The README's quick start runs as written."""

import re
from pathlib import Path


def test_readme_quick_start_runs():
    src = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", src, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
