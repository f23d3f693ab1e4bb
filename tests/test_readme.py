"""The README does what it says: its code runs as written, its set-up commands are CI's, its install keeps a GPU
user's torch, its summary is the benchmarks' JSON, and it stays short and free of dates."""

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
GUARD = '(python3 -c "import torch" 2>/dev/null || python3 -m pip install torch==2.13.0)'
# a calendar date, a compact timestamp (as in `<folder>.old-20261202-003228`) or a clock time / UTC
DATED = re.compile(r"\b20\d\d-\d\d-\d\d\b|\b20\d{6}-\d{6}\b|\b\d{1,2}:\d\d\b|\bUTC\b")


def _block(heading: str, lang: str) -> str:
    m = re.search(rf"^## {re.escape(heading)}\n.*?```{lang}\n(.*?)```", README, re.S | re.M)
    assert m, f"README has no ```{lang} block under '## {heading}'"
    return m.group(1)


def test_readme_quick_start_runs_and_labels_what_it_prints():
    """The quick start runs, is reproducible (every random call takes the generator) and prints labelled lines."""
    code = compile(_block("Quick start", "python"), "README.md", "exec")
    outs = []
    for _ in range(2):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(code, {})
        outs.append(buf.getvalue())
    assert outs[0] == outs[1], "the quick start prints different numbers on two runs: a draw bypasses the generator"
    lines = outs[0].strip().splitlines()
    assert len(lines) >= 2
    for line in lines:  # "what it is: value", never a bare number
        label, _, value = line.partition(": ")
        assert re.search(r"[a-zA-Z]{3}", label) and re.search(r"\d", value), line
    k = int(re.search(r"best K[^:]*: (\d+)", outs[0]).group(1))
    bound = float(re.search(r"plain estimator: ([\d.]+)x", outs[0]).group(1))
    assert 1 <= k <= 64 and bound >= 1.0  # the bound against the plain estimator is never below 1


def test_readme_test_command_is_ci_and_prints_the_count_line():
    """`.ci/run` runs exactly the README's test command, and pytest's options leave its `N passed` line on
    (`-q` there plus `-q` in addopts would be `-qq`, which prints no summary)."""
    cmd = re.search(r"^(.*python3 -m pip install -e \"\.\[test\]\" && python3 -m pytest.*)$", README, re.M).group(1)
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith(("#", "set", "cd"))]
    assert ci == [cmd]
    addopts = re.findall(r"^addopts\s*=\s*(.*)$", (ROOT / "pyproject.toml").read_text(), re.M)
    quiet = cmd.split().count("-q") + sum(a.count("-q") for a in addopts)
    assert quiet <= 1, (cmd, addopts)


def test_readme_set_up_commands_keep_an_installed_torch():
    """Both set-up commands (the main job's and the tests') install the CPU torch only where none is installed,
    and no line of the README pins torch unguarded (which would replace a GPU user's CUDA build)."""
    main = re.search(r"^(.*python3 -m pip install -e \. && python3 -m carv text-to-3d)$", README, re.M)
    tests = re.search(r"^(.*python3 -m pip install -e \"\.\[test\]\" && python3 -m pytest -q)$", README, re.M)
    assert main and tests, "the README lost one of its two set-up commands"
    for cmd in (main.group(1), tests.group(1)):
        assert cmd.startswith(GUARD + " && "), cmd
    for line in README.splitlines():
        if "pip install torch" in line and "`" not in line:
            assert GUARD in line, line
    assert "venv" in README


def test_readme_summary_is_the_benchmarks_json():
    from carv.bench.report import stale_blocks

    assert "<!-- generated: all:brief -->" in README
    assert stale_blocks(README, ROOT) == [], "README.md is stale: run `carv bench report --path README.md`"


def test_readme_stable_diffusion_snippet_runs_on_a_tiny_pipeline():
    """The Stable Diffusion snippet, as written, on the tiny random-weight pipeline on CPU: only the model load,
    the device and the renderer's inputs are swapped in."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import torch

    code = _block("Stable Diffusion", "python")
    swaps = {'StableDiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-2-1-base", '
             'torch_dtype=torch.float16)': "build_tiny_sd_pipeline()",
             '"cuda"': '"cpu"',
             "teacher.encode_images(rgb, generator=g)": "teacher.encode_images(rgb, size=64, generator=g)"}
    for old, new in swaps.items():
        assert old in code, f"the README's SD snippet no longer contains {old!r}"
        code = code.replace(old, new)
    from carv.teachers.tiny_sd import build_tiny_sd_pipeline

    rgb = torch.rand(2, 3, 64, 64, requires_grad=True)
    ns = {"build_tiny_sd_pipeline": build_tiny_sd_pipeline, "rgb": rgb,
          "elevation": torch.tensor([10.0, 30.0]), "azimuth": torch.tensor([0.0, 180.0])}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["out"].loss.isfinite() and rgb.grad is not None and rgb.grad.abs().sum() > 0


def test_readme_is_short_and_undated():
    assert len(README.splitlines()) <= 150
    assert not DATED.findall(README), DATED.findall(README)


def _local_links(text: str) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)#\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("doc", ["README.md", "BENCHMARKS.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_documents_link_to_files_that_exist_and_carry_no_dates(doc):
    path = ROOT / doc
    text = path.read_text()
    assert not DATED.findall(text), DATED.findall(text)
    missing = [t for t in _local_links(text) if not (path.parent / t).exists()]
    assert not missing, f"{doc} links to files that do not exist: {missing}"
