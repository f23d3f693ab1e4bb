"""BENCHMARKS.md and docs/*.json agree: every generated table is what `carv bench report` makes from the
JSON, and every benchmark JSON measured under the protocol carries a headline and a best-of-N object."""

import json
from pathlib import Path

import pytest

from carv.bench.report import BENCHMARKS, generate_benchmarks_md, protocol_status, stale_blocks

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_md_tables_match_the_json():
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert "<!-- generated: " in text, "BENCHMARKS.md has no generated blocks"
    assert stale_blocks(text, ROOT) == [], "BENCHMARKS.md is stale: run `carv bench report`"


def test_every_benchmark_has_a_generated_headline_block():
    text = (ROOT / "BENCHMARKS.md").read_text()
    for name in BENCHMARKS:
        assert f"<!-- generated: {name}:headline -->" in text, name


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_protocol_json_has_headline_and_best_of_n(name):
    path = ROOT / BENCHMARKS[name]
    if not path.is_file():
        pytest.skip(f"{path.name} not produced yet")
    res = json.loads(path.read_text())
    if protocol_status(res).startswith("not yet"):
        assert "headline" not in res and "best_of_n" not in res
        return
    h, b = res["headline"], res["best_of_n"]
    assert set(h) >= {"config", "value", "se", "chosen_by", "charged"} and h["charged"]
    assert set(b) >= {"n", "config", "value"} and b["n"] >= 1
    assert "command" in res and "loadavg_start" in res["machine"] and "loadavg_end" in res["machine"]


def test_generator_detects_a_disagreement_and_keeps_prose(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    res = {"command": "carv demo", "machine": {"loadavg_start": [1.0], "loadavg_end": [2.0]},
           "headline": {"config": {"method": "m", "R": 2, "K": 4}, "value": 2.0, "se": 0.1, "chosen_by": "a priori",
                        "charged": ["stages"]},
           "best_of_n": {"n": 5, "config": {"method": "m", "R": 2, "K": 8}, "value": 2.5},
           "rows": [{"method": "m", "R": 2, "K": 4, "ecm": 2.0}]}
    (docs / "demo_bench.json").write_text(json.dumps(res))
    text = "prose before\n<!-- generated: demo:headline -->\nold table\n<!-- /generated -->\nprose after\n"
    assert stale_blocks(text, tmp_path) == ["demo:headline"]
    new = generate_benchmarks_md(text, tmp_path)
    assert new.startswith("prose before\n") and new.endswith("prose after\n")
    assert "2.00x +- 0.10" in new and "N = 5" in new and stale_blocks(new, tmp_path) == []
    res["headline"]["value"] = 2.2  # the JSON moves on: the document is now stale
    (docs / "demo_bench.json").write_text(json.dumps(res))
    assert stale_blocks(new, tmp_path) == ["demo:headline"]
    with pytest.raises(ValueError, match="kind"):
        stale_blocks("<!-- generated: demo:nope -->\nx\n<!-- /generated -->", tmp_path)


def test_sd_memory_and_rerun_blocks_come_from_the_json(tmp_path):
    from carv.bench.report import render_block

    docs = tmp_path / "docs"
    docs.mkdir()
    mem = {"run": {"command": "carv bench sd --only memory", "machine": {}, "date": "d"}, "guidance_scale": 100.0,
           "memory": [{"K": 1, "max_batch": "auto", "peak_mib": 100.0, "seconds": 1.0},
                      {"K": 4, "max_batch": "auto", "peak_mib": 200.0, "seconds": 2.0},
                      {"K": 1, "max_batch": None, "peak_mib": 110.0, "seconds": 1.0}]}
    (docs / "sd_memory.json").write_text(json.dumps(mem))
    table = render_block("sd", "memory", tmp_path)
    assert "| 1 | 2 | 100 | 1.00 | 110 | 1.0 |" in table and "| 4 | 8 | 200 | 2.00 | not run | 2.0 |" in table

    def run(value, se, cmd):
        return {"command": cmd, "machine": {"loadavg_start": [1.0], "loadavg_end": [1.0]},
                "headline": {"config": {"method": "m", "R": 2, "K": 4}, "value": value, "se": se, "chosen_by": "x",
                             "charged": ["stages"]},
                "best_of_n": {"n": 3, "config": {"method": "m", "R": 2, "K": 8}, "value": 3.0}}
    res = {**run(2.0, 0.3, "first"), "reruns": [run(2.4, 0.4, "second"), run(4.0, 0.4, "third")]}
    (docs / "text_to_3d_bench.json").write_text(json.dumps(res))
    table = render_block("text-to-3d", "reruns", tmp_path)
    assert "| 2 | `second` |" in table and "+0.80 (agree)" in table  # (2.4 - 2.0) / 0.5
    assert "+4.00 (disagree)" in table  # (4.0 - 2.0) / 0.5


def test_benchmarks_md_is_short_and_undated():
    """At most 300 lines, and no calendar date, clock time or UTC anywhere (the run records in the JSON keep
    their dates; the document shows what the software does now)."""
    import re

    text = (ROOT / "BENCHMARKS.md").read_text()
    assert len(text.splitlines()) <= 300
    dated = re.findall(r"\b20\d\d-\d\d-\d\d\b|\b20\d{6}-\d{6}\b|\b\d{1,2}:\d\d\b|\bUTC\b", text)
    assert not dated, dated


def test_brief_summary_states_headline_bound_fraction_and_best_of_n(tmp_path):
    """The README's summary block: the a-priori headline with its error bar, its fraction of the bound (the
    headline's own, else its row's), the best of N as an upper bound, and the pending benchmarks named as such;
    generated blocks never print the JSON's date."""
    from carv.bench.report import render_block

    docs = tmp_path / "docs"
    docs.mkdir()
    res = {"command": "carv demo", "date": "2026-01-02 03:04 UTC",
           "machine": {"loadavg_start": [1.0], "loadavg_end": [2.0]},
           "headline": {"config": {"method": "m", "R": 2, "K": 4, "snapshot": "middle"}, "value": 2.0, "se": 0.1,
                        "chosen_by": "a priori", "charged": ["stages"]},
           "best_of_n": {"n": 5, "config": {"method": "m", "R": 2, "K": 8}, "value": 2.5},
           "rows": [{"checkpoint": "early", "method": "m", "R": 2, "K": 4, "bound_fraction": 0.2},
                    {"checkpoint": "middle", "method": "m", "R": 2, "K": 4, "bound_fraction": 0.7}]}
    (docs / "demo_bench.json").write_text(json.dumps(res))
    brief = render_block("all", "brief", tmp_path)
    assert "| demo | m R = 2 K = 4 (snapshot = middle) | 2.00x +- 0.10 | 0.70 | 2.50x of N = 5 |" in brief
    assert "| distill | no JSON | - | - | - |" in brief
    res["headline"]["bound_fraction"] = 0.9  # the headline's own fraction wins over its row's
    (docs / "demo_bench.json").write_text(json.dumps(res))
    assert "| 0.90 |" in render_block("all", "brief", tmp_path)
    # the app's own default (the regime sweep's native row) is what a user gets: it takes the headline's place
    res["headline_app_default"] = {"value": 1.5, "se": 0.1, "bound_fraction": 0.95, "R": 1, "K": 5,
                                   "cost_ratio": 3.6}
    (docs / "demo_bench.json").write_text(json.dumps(res))
    assert ("| demo | the app's default, R = 1 K = 5 (cost ratio 3.6) | 1.50x +- 0.10 | 0.95 | - (rows on another "
            "protocol) |") in render_block("all", "brief", tmp_path)
    # each seed's run chose its own K: every choice is shown, not the first seed's alone
    res["headline_app_default"] |= {"R_by_seed": [1, 1, 1], "K_by_seed": [7, 5, 5]}
    (docs / "demo_bench.json").write_text(json.dumps(res))
    brief = render_block("all", "brief", tmp_path)
    assert "| the app's default, R = 1 K = 7, 5, 5 (by seed) (cost ratio 3.6) |" in brief
    for kind in ("run", "headline", "summary", "brief"):
        assert "2026" not in render_block("demo", kind, tmp_path)


def test_regime_block_shows_every_app_and_the_mean_k_of_a_mix(tmp_path):
    """The regime table comes from each app's ``regime_sweep``: K by seed (a seed that mixes in K + 1 on a share of
    its steps shows its mean K per step), ECM +- SE, bound and fraction; an app without a sweep shows a dash; the
    README's summary shows the mean K too."""
    from carv.bench.regime import write_regime_sweep
    from carv.bench.report import render_block

    docs = tmp_path / "docs"
    docs.mkdir()
    seed = {"R": 1, "K": 2, "mix": [1, 3, 0.93], "cost_ratio": 1.0}
    rows = [{"cost_ratio": 1.0, "headline_ecm": 2.4, "headline_se": 0.06, "bound_ecm": 2.58, "bound_fraction": 0.93,
             "K": 2, "R": 1, "native": False, "per_seed": [seed, seed | {"K": 3, "mix": None}]},
            {"cost_ratio": 4.0, "headline_ecm": 4.0, "headline_se": 0.1, "bound_ecm": 4.2, "bound_fraction": 0.95,
             "K": 5, "R": 1, "native": True, "per_seed": [seed | {"K": 5, "mix": [1, 6, 0.82]}]}]
    write_regime_sweep(docs / "demo_bench.json", rows, {"command": "x"}, 4.0)
    table = render_block("all", "regime", tmp_path)
    assert "| 1 | - | K 2.9/3, 2.40 +- 0.06, 2.58, 0.93 | - |" in table
    assert "| native (-; 4; -) | - | K 5.8, 4.00 +- 0.10, 4.20, 0.95 | - |" in table
    data = json.loads((docs / "demo_bench.json").read_text())
    assert data["headline_app_default"]["K_by_seed"] == [5.82]
    data["headline"] = {"value": 1.0, "config": {"method": "m", "R": 1, "K": 1}}
    data["best_of_n"] = {"n": 1, "value": 1.0, "config": {"method": "m", "R": 1, "K": 1}}
    data["headline_app_default"] |= {"K_by_seed": [5.82, 4.5], "R_by_seed": [1, 1]}
    (docs / "demo_bench.json").write_text(json.dumps(data))
    assert "R = 1 K = 5.8, 4.5 (by seed; mean per step)" in render_block("all", "brief", tmp_path)
    assert render_block("all", "regime", tmp_path / "nothing") == "No regime sweep in the JSON yet.\n"
