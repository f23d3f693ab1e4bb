"""Tables (terminal and Markdown) and plots for benchmark rows. Pure presentation: no measurement.

``smoke=True`` (a ``--quick`` run) writes "smoke run, not a measurement" beside every ratio.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from carv._runfolder import atomic_write_text, save_figure
from carv.bench.regime import mean_k

__all__ = ["format_value", "markdown_table", "print_table", "plot_variance_vs_cost", "plot_ecm_vs_k",
           "plot_metric_vs_k", "RATIO_COLUMNS", "SMOKE", "render_block", "generate_benchmarks_md", "stale_blocks",
           "write_benchmarks_md", "protocol_status"]

DEFAULT_COLUMNS = ("method", "R", "K", "variance", "cost_s", "re", "ecm", "bound_fraction")
# columns holding ratios (speed-ups, efficiencies): a smoke run labels every one of them
RATIO_COLUMNS = frozenset({"re", "ecm", "ecm_se", "bound_fraction", "cost_check", "ecm_ci", "ratio", "ecm_psnr",
                           "ecm_iou", "variance_reduction", "headline", "best_of_n"})
SMOKE = "smoke run, not a measurement"


def format_value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 1e4 or abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return ", ".join(f"{k} {format_value(x)}" for k, x in v.items()) or "-"
    return str(v)


def _smoke_columns(columns: Sequence[str], smoke: bool) -> tuple[list[str], bool]:
    """A smoke run's table gets a "note" column saying so on every row that shows a ratio."""
    labelled = smoke and any(c in RATIO_COLUMNS for c in columns)
    return [*columns, "note"] if labelled else list(columns), labelled


def _cells(r: dict, columns: Sequence[str], labelled: bool) -> list[str]:
    return [SMOKE if (labelled and c == "note") else format_value(r.get(c)) for c in columns]


def markdown_table(rows: Sequence[dict], columns: Sequence[str] = DEFAULT_COLUMNS, smoke: bool = False) -> str:
    columns, labelled = _smoke_columns(columns, smoke)
    head = "| " + " | ".join(columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_cells(r, columns, labelled)) + " |" for r in rows]
    return "\n".join([head, sep, *body])


# short headers for the console (a table of a dozen columns must stay readable at 80 columns; the Markdown and
# JSON keep the full names)
CONSOLE_HEADERS = {"variance": "var", "variance_se": "var SE", "cost_s": "cost s", "cost_wall_s": "wall s",
                   "re": "RE", "ecm": "ECM", "ecm_se": "ECM SE", "bound_fraction": "of bound"}


def print_table(rows: Sequence[dict], columns: Sequence[str] = DEFAULT_COLUMNS, title: str | None = None,
                highlight: set[tuple] | None = None, smoke: bool = False) -> None:
    """The rows on the console, at its width (80 columns when it is not a terminal): short headers that wrap, no
    vertical rules, numbers never cut, and a long method name broken after a ``+`` when the table would not fit
    otherwise. A smoke run's title and caption say so (the Markdown table has a note column instead)."""
    from rich.console import Console

    console = Console()
    table = _console_table(rows, list(columns), title, highlight, smoke, break_names=False)
    wide = Console(width=10_000, file=io.StringIO())
    wide.print(table)
    if max(map(len, wide.file.getvalue().rstrip().splitlines()), default=0) > console.width:
        table = _console_table(rows, list(columns), title, highlight, smoke, break_names=True)
    console.print(table)


def _console_table(rows, columns, title, highlight, smoke, break_names):
    from rich import box
    from rich.table import Table

    labelled = smoke and any(c in RATIO_COLUMNS for c in columns)
    table = Table(title=(f"{title} [{SMOKE}]" if smoke and title else title), box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True, show_edge=False, caption=f"{SMOKE}: every ratio above" if labelled else None)
    cells = [_cells(r, columns, False) for r in rows]
    for i, c in enumerate(columns):
        text = c in ("method", "config")
        if text and break_names:
            for row in cells:
                row[i] = row[i].replace("+", "+\n")
        head = CONSOLE_HEADERS.get(c, c)
        widest = max((len(line) for row in cells for line in row[i].split("\n")), default=1)
        table.add_column(head, justify="left" if text else "right", min_width=widest)
    for r, row in zip(rows, cells, strict=True):
        style = "bold green" if highlight and (r.get("method"), r.get("R"), r.get("K")) in highlight else None
        table.add_row(*row, style=style)
    return table


def _methods(rows):
    return list(dict.fromkeys(r["method"] for r in rows))


def plot_variance_vs_cost(rows: Sequence[dict], path: str | Path, title: str = "",
                          cost_label: str = "cost per estimate (s, median wall-clock)") -> None:
    """Log-log variance against seconds per estimate, one colour per method, points labelled (R, K).

    A method measured at several ``R`` gets one line per ``R`` (line style by ``R``), so that each line
    shows the effect of ``K`` alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    all_R = sorted({r["R"] for r in rows})
    styles = {R: ("-", "--", ":", "-.")[i % 4] for i, R in enumerate(all_R)}
    for i, m in enumerate(_methods(rows)):
        for j, R in enumerate(sorted({r["R"] for r in rows if r["method"] == m})):
            rs = sorted((r for r in rows if r["method"] == m and r["R"] == R), key=lambda r: r["cost_s"])
            ax.plot([r["cost_s"] for r in rs], [r["variance"] for r in rs], "o", ls=styles[R], color=f"C{i % 10}",
                    label=m if j == 0 else None, alpha=0.8)
        rs = [r for r in rows if r["method"] == m]
        for r in rs:
            ax.annotate(f"{r['R']},{r['K']}", (r["cost_s"], r["variance"]), fontsize=6, alpha=0.7,
                        xytext=(2, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(cost_label)
    ax.set_ylabel("variance of the gradient estimate (trace)")
    ax.set_title(title or "variance vs compute, labelled (R, K)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if len(all_R) > 1:
        for R in all_R:
            ax.plot([], [], color="grey", ls=styles[R], label=f"R = {R}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_ecm_vs_k(rows: Sequence[dict], path: str | Path, R: int | None = None, title: str = "") -> None:
    """ECM against K (log2 axis) per method, at one R (default: the most common R), with +-1 SE error bars
    (``ecm_se``) where the rows have them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if R is None:
        Rs = [r["R"] for r in rows]
        R = max(set(Rs), key=Rs.count)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for m in _methods(rows):
        rs = sorted((r for r in rows if r["method"] == m and r["R"] == R), key=lambda r: r["K"])
        if rs:  # error bars: the row's ecm_se (bootstrap over rounds, cost noise included) where measured
            se = [r.get("ecm_se") or 0.0 for r in rs]
            ax.errorbar([r["K"] for r in rs], [r["ecm"] for r in rs], yerr=se if any(se) else None, fmt="o-",
                        capsize=3, label=m)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (draws per upstream sample)")
    ax.set_ylabel("ECM vs baseline (higher is better)")
    ax.set_title(title or f"effective compute multiplier, R = {R}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_metric_vs_k(rows: Sequence[dict], path: str | Path, metric: str, ylabel: str | None = None, title: str = "",
                     logy: bool = False, xlabel: str = "K (evaluations per upstream sample)",
                     hline: float | None = None) -> None:
    """Any row metric against K (log2 axis), one line per method; rows whose metric is None are skipped.

    Methods named ``"name|variant"`` share a colour per ``name`` and a line style per ``variant`` (so
    e.g. independent and shared draws of one sampler read as a pair). Error bars from ``metric_se``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = _methods(rows)
    names = list(dict.fromkeys(m.split("|")[0] for m in methods))
    variants = list(dict.fromkeys(m.split("|")[1] if "|" in m else "" for m in methods))
    colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
    styles = {v: ("-", "--", ":", "-.")[i % 4] for i, v in enumerate(variants)}
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for m in methods:
        name, _, variant = m.partition("|")
        rs = sorted((r for r in rows if r["method"] == m and r.get(metric) is not None), key=lambda r: r["K"])
        if not rs:
            continue
        se = [r.get(f"{metric}_se") or 0.0 for r in rs]
        ax.errorbar([r["K"] for r in rs], [r[metric] for r in rs], yerr=se, fmt="o", ls=styles[variant],
                    color=colours[name], label=m, ms=3.5, capsize=2, alpha=0.85)
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or metric)
    ax.set_title(title or f"{metric} vs K")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------ BENCHMARKS.md from docs/*.json
# Generated blocks in BENCHMARKS.md:  <!-- generated: NAME:KIND -->  ...  <!-- /generated -->
# NAME is a benchmark (docs/NAME_bench.json); KIND is one of GENERATORS. Everything outside the blocks is
# hand-written prose and is kept as it is, so other sections (and their authors) live beside them.
BENCHMARKS = {"demo": "docs/demo_bench.json", "text-to-3d": "docs/text_to_3d_bench.json",
              "attribution": "docs/attribution_bench.json",
              # the same benchmark in a second configuration: budgets to 64 evaluations, journey-TRAK
              "attribution-64": "docs/attribution_64_bench.json", "distill": "docs/distill_bench.json"}
# measurements that are not ECM benchmarks (no headline / best-of-N) but whose tables are generated too
TABLES = {"sd": "docs/sd_memory.json"}
PENDING = "not yet measured under the protocol"
ROW_COLUMNS = ("method", "R", "K", "n", "variance", "variance_se", "cost_s", "cost_wall_s", "re", "ecm", "ecm_se",
               "bound_fraction")
_BLOCK = re.compile(r"<!-- generated: (?P<name>[\w.-]+):(?P<kind>[\w-]+) -->\n(?P<body>.*?)<!-- /generated -->",
                    re.DOTALL)


def _ratio(v, se=None, ci=None) -> str:
    if v is None:
        return "-"
    s = f"{v:.2f}x"
    if se is not None:
        s += f" +- {se:.2f}"
    if ci:
        s += f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})"
    return s


def _config(c: dict | None) -> str:
    if not c:
        return "-"
    rest = ", ".join(f"{k} = {v}" for k, v in c.items() if k not in ("method", "R", "K"))
    return f"{c.get('method')} R = {c.get('R')} K = {c.get('K')}" + (f" ({rest})" if rest else "")


def _load(res: dict) -> str:
    m = res.get("machine") or {}
    a, b = m.get("loadavg_start"), m.get("loadavg_end")
    if a and b:
        return f"{a[0]:.1f} -> {b[0]:.1f}"
    return "not recorded"


def protocol_status(res: dict | None) -> str:
    if res is None:
        return "no JSON"
    if "headline" not in res or "best_of_n" not in res:
        return PENDING
    return "smoke run, not a measurement" if res.get("smoke") else "measured under the protocol"


def _gen_headline(name: str, res: dict | None, root: Path) -> str:
    status = protocol_status(res)
    head = "| benchmark | status | headline (a priori) | value | chosen by | charged | best of N (upper bound) |"
    sep = "| --- | --- | --- | --- | --- | --- | --- |"
    if status in (PENDING, "no JSON"):
        return "\n".join([head, sep, f"| {name} | {status} | - | - | - | - | - |"])
    h, b = res["headline"], res["best_of_n"]
    best = f"{_ratio(b['value'], b.get('se'))} of N = {b['n']} ({_config(b['config'])})"
    note = f" ({SMOKE})" if res.get("smoke") else ""
    return "\n".join([head, sep, f"| {name} | {status} | {_config(h['config'])} | "
                                 f"{_ratio(h['value'], h.get('se'), h.get('ci95'))}{note} | {h['chosen_by']} | "
                                 f"{'; '.join(h['charged'])} | {best}{note} |"])


def _gen_run(name: str, res: dict | None, root: Path) -> str:
    if res is None:
        return "No JSON for this benchmark yet."
    m = res.get("machine") or {}
    lines = [f"- Command: `{res.get('command', 'not recorded')}`",
             f"- Machine: {m.get('platform', 'not recorded')}, {m.get('cpu_count', '?')} CPUs, torch "
             f"{m.get('torch', '?')}, {m.get('threads', '?')} thread(s); "
             f"load average (1 min) {_load(res)}; status: {protocol_status(res)}."]
    return "\n".join(lines)


# each benchmark's row columns (its JSON's row fields)
ROW_COLUMNS_OF = {
    "text-to-3d": ("checkpoint", "method", "R", "K", "n", "variance", "variance_se", "bias2", "cost_s", "cost_wall_s",
                   "re", "ecm", "ecm_se", "bound_fraction"),
    "attribution": ("method", "crn", "budget", "n", "variance", "spearman", "spearman_se", "ecm", "ecm_bound",
                    "ecm_wall", "ecm_pilot_bench", "ecm_pilot_trainset"),
    "attribution-64": ("method", "crn", "budget", "n", "variance", "bias2", "spearman", "spearman_se", "top10", "ecm",
                       "ecm_bound", "ecm_se", "ecm_wall"),
    "distill": ("checkpoint", "config", "R", "K", "n", "variance", "variance_se", "reduction_vs_R8K1", "cost_s",
                "cost_wall_s", "ecm", "ecm_se", "ecm_step"),
}


def _gen_rows(name: str, res: dict | None, root: Path) -> str:
    if res is None or protocol_status(res) == PENDING:
        return f"Rows: {PENDING}."
    return markdown_table(res["rows"], ROW_COLUMNS_OF.get(name, ROW_COLUMNS), smoke=bool(res.get("smoke")))


def _benchmark_results(root: Path):
    """``(benchmark, JSON or None, protocol status, measured)`` for every benchmark, in table order; ``measured``
    is False while the JSON is missing or pending (no headline to show)."""
    for bench, path in BENCHMARKS.items():
        r = _read_json(root / path)
        st = protocol_status(r)
        yield bench, r, st, st not in (PENDING, "no JSON")


def _gen_summary(name: str, res: dict | None, root: Path) -> str:
    head = "| benchmark | status | headline (a priori) | best of N (upper bound) | load (1 min) | command |"
    sep = "| --- | --- | --- | --- | --- | --- |"
    body = []
    for bench, r, st, measured in _benchmark_results(root):
        if not measured:
            body.append(f"| {bench} | {st} | - | - | {_load(r) if r else '-'} | `{(r or {}).get('command', '-')}` |")
            continue
        h, b = r["headline"], r["best_of_n"]
        note = f" ({SMOKE})" if r.get("smoke") else ""
        body.append(f"| {bench} | {st} | {_ratio(h['value'], h.get('se'))}{note}, {_config(h['config'])} | "
                    f"{_ratio(b['value'])} of N = {b['n']}{note} | {_load(r)} | `{r.get('command')}` |")
    return "\n".join([head, sep, *body])


def _headline_bound_fraction(res: dict) -> float | None:
    """The headline's fraction of the efficiency bound: its own ``bound_fraction``, else that of the row it
    was measured as (same method, ``R``, ``K`` and snapshot), else None (not measured)."""
    h = res["headline"]
    if h.get("bound_fraction") is not None:
        return h["bound_fraction"]
    c = h.get("config") or {}
    snap = c.get("snapshot", c.get("checkpoint"))
    for r in res.get("rows", []):
        if (r.get("method"), r.get("R"), r.get("K")) == (c.get("method"), c.get("R"), c.get("K")) \
                and (snap is None or r.get("checkpoint") == snap) and r.get("bound_fraction") is not None:
            return r["bound_fraction"]
    return None


def _by_seed(app: dict, key: str) -> str:
    """``K = 4``, or ``K = 7, 5, 5 (by seed)`` where the seeds' runs chose differently; a run that mixes in
    ``K + 1`` on a share of its steps shows its mean ``K`` per step (``K = 5.8``)."""
    seeds = app.get(f"{key}_by_seed")
    def show(v) -> str:
        return str(v) if isinstance(v, int) else f"{v:.1f}"

    mean = any(isinstance(v, float) for v in seeds or ())
    if not seeds or len(set(seeds)) == 1:
        return f"{key} = {show(app[key] if not seeds else seeds[0])}" + (" (mean per step)" if mean else "")
    return f"{key} = {', '.join(show(v) for v in seeds)} (by seed" + ("; mean per step)" if mean else ")")


def _gen_brief(name: str, res: dict | None, root: Path) -> str:
    """The README's summary: each benchmark's a-priori headline with its error bar and its fraction of the
    efficiency bound, and the best of N rows as an upper bound (the commands are in BENCHMARKS.md)."""
    head = "| benchmark | headline, fixed in advance | ECM | fraction of bound | best of N (upper bound) |"
    lines = [head, "| --- | --- | --- | --- | --- |"]
    for bench, r, st, measured in _benchmark_results(root):
        if not measured:
            lines.append(f"| {bench} | {st} | - | - | - |")
            continue
        h, b, f = r["headline"], r["best_of_n"], _headline_bound_fraction(r)
        note = f" ({SMOKE})" if r.get("smoke") else ""
        app = r.get("headline_app_default")
        if app is not None:  # the app's own run (regime sweep, native cost ratio) is what a user gets
            config = (f"the app's default, {_by_seed(app, 'R')} {_by_seed(app, 'K')} "
                      f"(cost ratio {app['cost_ratio']:.1f})")
            h, f = {"value": app["value"], "se": app.get("se")}, app.get("bound_fraction")
            best = "- (rows on another protocol)"
        else:
            config, best = _config(h["config"]), f"{_ratio(b['value'])} of N = {b['n']}{note}"
        lines.append(f"| {bench} | {config} | {_ratio(h['value'], h.get('se'))}{note} | "
                     f"{'not measured' if f is None else f'{f:.2f}'} | {best} |")
    return "\n".join(lines)


REGIME_APPS = (("text-to-3d", "text-to-3D: K by seed, ECM, bound, fraction"), ("demo", "demo (toy)"),
               ("distill", "distillation (Accountant, plain `R = 8`)"))


def _gen_regime(name: str, res: dict | None, root: Path) -> str:
    """The regime sweep of every app (``regime_sweep`` in its JSON): per cost ratio each app's ``K`` by seed (the
    mean ``K`` of a step where the allocator mixes in ``K + 1``), ECM with its SE, bound and fraction."""
    sweeps = {app: (_read_json(root / BENCHMARKS[app]) or {}).get("regime_sweep") or [] for app, _ in REGIME_APPS}
    n = max((len(v) for v in sweeps.values()), default=0)
    if n == 0:
        return "No regime sweep in the JSON yet."
    lines = ["| cost ratio | " + " | ".join(label for _, label in REGIME_APPS) + " |",
             "| --- |" + " --- |" * len(REGIME_APPS)]
    for i in range(n):
        rows = [sweeps[app][i] if i < len(sweeps[app]) else None for app, _ in REGIME_APPS]
        ref = next(r for r in rows if r is not None)
        if ref.get("native"):
            label = "native (" + "; ".join(f"{r['cost_ratio']:.2g}" if r else "-" for r in rows) + ")"
        else:
            label = f"{ref['cost_ratio']:g}"
        cells = []
        for r in rows:
            if r is None:
                cells.append("-")
                continue
            ks = "/".join(mean_k(q) for q in r.get("per_seed", [r]))
            cells.append(f"K {ks}, {r['headline_ecm']:.2f} +- {r['headline_se']:.2f}, {r['bound_ecm']:.2f}, "
                         f"{r['bound_fraction']:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gen_memory(name: str, res: dict | None, root: Path) -> str:
    """``carv bench sd --only memory``: peak memory of one latent SDS step against K, per ``max_batch``."""
    if res is None or not res.get("memory"):
        return "No memory rows in the JSON yet."
    run = res.get("run") or {}
    m = run.get("machine") or {}
    by = {(r["K"], r["max_batch"]): r for r in res["memory"]}
    ks = sorted({r["K"] for r in res["memory"]})
    rows_per_draw = 2 if res.get("guidance_scale") else 1
    k1 = by.get((ks[0], "auto"))
    lines = [f"- Command: `{run.get('command', 'not recorded')}`",
             f"- Machine: {m.get('platform', 'not recorded')}, {m.get('cpu_count', '?')} CPUs, torch "
             f"{m.get('torch', '?')}, {m.get('threads', '?')} thread(s); "
             f"load average (1 min) {_load(run)}; {res.get('pipeline', '')}, {res.get('device', '')}.", "",
             f"| K | UNet rows | peak MiB, `max_batch=\"auto\"` (default) | x K = {ks[0]} | peak MiB, "
             f"`max_batch=None` | step seconds (auto) |", "| --- | --- | --- | --- | --- | --- |"]
    for k in ks:
        a, n = by.get((k, "auto")), by.get((k, None))
        auto = f"{a['peak_mib']:.0f}" if a else "not run"
        ratio = f"{a['peak_mib'] / k1['peak_mib']:.2f}" if a and k1 else "-"
        none = f"{n['peak_mib']:.0f}" if n else "not run"
        secs = f"{a['seconds']:.1f}" if a else "-"
        lines.append(f"| {k} | {rows_per_draw * k} | {auto} | {ratio} | {none} | {secs} |")
    return "\n".join(lines)


def _gen_reruns(name: str, res: dict | None, root: Path) -> str:
    """The benchmark's run and its independent reruns (``res["reruns"]``: other seeds, run one after the
    other), headline by headline, and whether each rerun's headline agrees with the first within the
    error bars: ``z = (value_i - value_0) / sqrt(se_0^2 + se_i^2)``, agreement at ``|z| <= 2``."""
    if res is None or "headline" not in res:
        return f"Reruns: {PENDING}."
    runs = [res, *res.get("reruns", [])]
    head = "| run | command | headline (a priori) | ECM | best of N (upper bound) | load (1 min) | z vs run 1 |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- |"]
    h0 = res["headline"]
    for i, r in enumerate(runs):
        h, b = r["headline"], r["best_of_n"]
        if i == 0:
            z = "-"
        elif h0.get("se") and h.get("se"):
            zv = (h["value"] - h0["value"]) / math.hypot(h0["se"], h["se"])
            z = f"{zv:+.2f} ({'agree' if abs(zv) <= 2 else 'disagree'})"
        else:
            z = "no error bars"
        lines.append(f"| {i + 1} | `{r.get('command')}` | {_config(h['config'])} | "
                     f"{_ratio(h['value'], h.get('se'), h.get('ci95'))} | {_ratio(b['value'])} of N = {b['n']} | "
                     f"{_load(r)} | {z} |")
    return "\n".join(lines)


GENERATORS = {"headline": _gen_headline, "run": _gen_run, "rows": _gen_rows, "summary": _gen_summary,
              "brief": _gen_brief, "memory": _gen_memory, "reruns": _gen_reruns, "regime": _gen_regime}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def render_block(name: str, kind: str, root: str | Path = ".") -> str:
    """The Markdown of one generated block, from ``root/docs/*.json``."""
    if kind not in GENERATORS:
        raise ValueError(f"kind: unknown generated block {kind!r} (for {name!r}); allowed: {sorted(GENERATORS)}")
    paths = {**BENCHMARKS, **TABLES}
    if name not in paths and name != "all":
        raise ValueError(f"name: unknown benchmark {name!r}; allowed: {sorted(paths)} or 'all'")
    res = _read_json(Path(root) / paths[name]) if name in paths else None
    return GENERATORS[kind](name, res, Path(root)).rstrip("\n") + "\n"


def generate_benchmarks_md(text: str, root: str | Path = ".") -> str:
    """``text`` (BENCHMARKS.md) with every generated block rewritten from the JSON; prose kept."""
    return _BLOCK.sub(lambda m: (f"<!-- generated: {m['name']}:{m['kind']} -->\n"
                                 f"{render_block(m['name'], m['kind'], root)}<!-- /generated -->"), text)


def stale_blocks(text: str, root: str | Path = ".") -> list[str]:
    """Names of the generated blocks whose text differs from what the JSON gives (empty: consistent)."""
    return [f"{m['name']}:{m['kind']}" for m in _BLOCK.finditer(text)
            if m["body"] != render_block(m["name"], m["kind"], root)]


def write_benchmarks_md(path: str | Path = "BENCHMARKS.md", root: str | Path = ".", check: bool = False) -> list[str]:
    """``carv bench report``: regenerate the tables of ``path`` from ``root/docs/*.json`` (``check``: only
    report which blocks are stale). Returns the stale blocks found before writing."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"path: no such file {str(p)!r}")
    text = p.read_text()
    stale = stale_blocks(text, root)
    if not check and stale:
        atomic_write_text(p, generate_benchmarks_md(text, root))
    return stale
