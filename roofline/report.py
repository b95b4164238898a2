"""Roofline reports: ``index.html`` with charts, ``report.md`` and ``report.json``.

``report(results, machine, out_dir)`` places every measured kernel run on its device's roofline
and writes three files:

- ``index.html``: self-contained (charts are inline SVG drawn with matplotlib; no script, no
  network): the machine's roofs with where each figure came from, one roofline chart per device
  and suite family with every measured point labelled by its % of attainable, one efficiency
  bar chart per suite (every row, labelled), the targets, the recommendations, model
  predictions, and a table of every row;
- ``report.md``: the same tables in Markdown, followed by ``extra_markdown`` (the benchmark's
  own detailed tables when ``bench.report`` calls this);
- ``report.json``: the machine(s), every point (``Point.to_dict()`` plus its row's labels), the
  targets, recommendations and analyses, beside the keys of ``results`` when it is a dict (or
  its rows under ``rows``).

A *row* is a dict with ``median_ms`` (or ``seconds``), ``flops`` and ``bytes`` (what the run was
credited with) and optionally ``dtype`` / ``roof_dtype`` (default ``"bf16"``), ``device``
(default ``"cpu"``), ``method``, ``label``, ``impl`` (rows whose ``impl`` starts with ``"pk."``
or that carry ``baseline=False`` are this package's kernels; the rest are baselines), ``group``
or ``suite`` (the chart they go in). Rows without a time or a cost (memory or accuracy tables)
are kept in ``report.json`` and left off the charts.

Where the figures come from is stated on the page: *measured* (this run's timings and the
machine probe), *table* (``roofline.hardware`` datasheet figures) and *predicted* (the cost
model: attainable times, ``analyze_model`` rows, the advisor's estimates).

Example
-------
>>> import tempfile
>>> from roofline import MachineProfile
>>> m = MachineProfile("toy", {"bf16": 1e12}, {"read": 1e10, "copy": 1e10, "triad": 1e10},
...                    source="measured")
>>> rows = [{"label": "L=4096", "method": "lean", "median_ms": 2.0, "flops": 1e6, "bytes": 1e7}]
>>> paths = report(rows, m, tempfile.mkdtemp())
>>> sorted(paths)
['html', 'json', 'markdown']
"""

from __future__ import annotations

import html
import io
import json
import math
import numbers
import os
import time

from .cost import Cost
from .hardware import MachineProfile, get_machine
from .place import Point, place, roof_dtype

__all__ = ["report", "collect_points", "roofline_chart_svg", "efficiency_chart_svg"]

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
            "#17becf", "#7f7f7f", "#bcbd22"]
_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
                "float": "fp32", "int8": "int8"}


# --------------------------------------------------------------------------------------------
# rows -> points

def _row_seconds(row: dict) -> float | None:
    if row.get("seconds"):
        return float(row["seconds"])
    if row.get("median_ms"):
        return float(row["median_ms"]) / 1e3
    return None


def _is_baseline(row: dict) -> bool:
    if "baseline" in row:
        return bool(row["baseline"])
    return not str(row.get("impl", "pk.")).startswith("pk.")


def _group(row: dict) -> str:
    return str(row.get("group") or row.get("suite") or "results")


def _family(group: str) -> str:
    """Chart family of a suite name: ``attention-3`` -> ``attention``."""
    return group.rsplit("-", 1)[0] if group.rsplit("-", 1)[-1].isdigit() else group


def _device_type(device) -> str:
    """"cuda:0" -> "cuda" (rows and machine keys are compared by device type)."""
    return str(device or "cpu").split(":", 1)[0]


def _machines(machine) -> dict[str, MachineProfile]:
    if isinstance(machine, dict) and not isinstance(machine, MachineProfile):
        if not machine:
            raise ValueError("machine: expected a MachineProfile, a HARDWARE name or a non-empty "
                             "dict device -> MachineProfile, got {}")
        return {_device_type(k): get_machine(v) for k, v in machine.items()}
    return {"cpu": get_machine(machine)}


def _finite(v, allow_zero: bool) -> bool:
    return (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            and (v >= 0 if allow_zero else v > 0))


def collect_points(rows: list[dict], machine) -> list[dict]:
    """Place every timed row with a cost on its device's machine.

    Returns one dict per placed row: ``Point.to_dict()`` plus ``label``, ``method``, ``group``,
    ``device``, ``baseline``. ``machine`` is a profile / HARDWARE name (used for every device)
    or a dict device -> profile. A row whose device has no machine, or whose cost cannot be
    placed, is returned with ``error`` instead of the point fields.
    """
    machines = _machines(machine)
    out = []
    for row in rows:
        seconds = _row_seconds(row)
        if seconds is None or not row.get("bytes"):
            continue
        device = _device_type(row.get("device"))
        base = {"label": str(row.get("label", "")), "method": str(row.get("method", "")),
                "group": _group(row), "device": device, "baseline": _is_baseline(row)}
        m = machines.get(device, next(iter(machines.values())) if len(machines) == 1 else None)
        if m is None:
            out.append(dict(base, error=f"no machine for device {device!r}"))
            continue
        bad = [k for k, v, zero in (("seconds", seconds, False), ("bytes", row["bytes"], False),
                                    ("flops", row.get("flops") or 0.0, True)) if not _finite(v, zero)]
        if bad:
            out.append(dict(base, error=f"not placed: {', '.join(bad)} not a finite number > 0"))
            continue
        dt = str(row.get("roof_dtype") or row.get("dtype") or "bf16")
        dt = _DTYPE_NAMES.get(dt.replace("torch.", ""), dt)
        try:
            # a memory-only machine (no compute peaks) places rows on the memory roof alone
            flops = float(row.get("flops") or 0.0) if m.peak_flops else 0.0
            cost = Cost(flops, float(row["bytes"]), roof_dtype(dt, m), name=base["method"])
            p = place(cost, seconds, m)
        except (TypeError, ValueError) as e:
            out.append(dict(base, error=f"{type(e).__name__}: {e}"))
            continue
        out.append(dict(p.to_dict(), **base))
    return out


# --------------------------------------------------------------------------------------------
# charts

def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("roofline.report draws its charts with matplotlib: pip install "
                          "matplotlib (or pykernels[report])") from e
    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt
    return plt


def _svg(fig) -> str:
    plt = _plt()
    buf = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none"}):  # text stays text: searchable, selectable
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    s = buf.getvalue()
    return s[s.index("<svg"):]  # drop the XML prolog and doctype: inline in HTML


def _fmt_rate(v: float, unit: str) -> str:
    for scale, p in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if v >= scale:
            return f"{v / scale:.3g} {p}{unit}"
    return f"{v:.3g} {unit}"


def _tex_safe(text: str) -> str:
    """Chart text with ``$`` escaped (matplotlib would read it as math mode)."""
    return str(text).replace("$", r"\$")


def _place_labels(ax, pts, texts, fontsize=7.5):
    """Label points without overlap: try offsets around each point in display pixels, keep the
    first whose box hits no placed label; points left unlabelled are returned (the tables list
    them all)."""
    fig = ax.figure
    fig.canvas.draw()
    offsets = [(5, 3), (5, -11), (-5, 3), (-5, -11), (5, 13), (5, -21), (-5, 13), (-5, -21),
               (5, 23), (5, -31), (-5, 23), (-5, -31)]
    placed, missed = [], []
    w_char, h = 0.6 * fontsize * fig.dpi / 72, fontsize * fig.dpi / 72 * 1.2
    for (x, y), t in zip(pts, texts):
        px, py = ax.transData.transform((x, y))
        w = w_char * len(t)
        for dx, dy in offsets:
            ox, oy = dx * fig.dpi / 72, dy * fig.dpi / 72
            x0 = px + ox if dx > 0 else px + ox - w
            box = (x0, py + oy, x0 + w, py + oy + h)
            if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed):
                placed.append(box)
                ax.annotate(t, (x, y), xytext=(dx, dy), textcoords="offset points",
                            fontsize=fontsize, ha="left" if dx > 0 else "right", va="bottom",
                            color="#222")
                break
        else:
            missed.append(t)
    return missed


def roofline_chart_svg(points: list[dict], machine: MachineProfile, title: str) -> str:
    """Log-log roofline of ``machine`` with ``points`` (from :func:`collect_points`).

    x: arithmetic intensity in FLOP per byte of memory traffic; y: achieved GFLOP/s. The memory
    roof is the machine's read bandwidth; one horizontal roof per peak dtype the points use
    (dotted for the machine's other dtypes). Each point is labelled with its % of attainable;
    pykernels kernels are filled markers, baselines hollow.
    """
    plt = _plt()
    pts = [p for p in points if not p.get("error") and p.get("flops") and p.get("intensity")]
    fig, ax = plt.subplots(figsize=(8.6, 5.2), dpi=100)
    bw = machine.mem_bandwidth["read"]
    used = sorted({p["dtype"] for p in pts}) or sorted(machine.peak_flops)[:1]
    xs = [p["intensity"] for p in pts] or [1.0]
    ridge = max(machine.peak(d) / bw for d in machine.peak_flops)
    lo = 10 ** math.floor(math.log10(min(min(xs), 1.0) / 2))
    hi = 10 ** math.ceil(math.log10(max(max(xs), ridge) * 4))
    for d in sorted(machine.peak_flops, key=machine.peak):
        peak = machine.peak(d)
        x_knee = peak / bw
        style = dict(color="#444", lw=1.6) if d in used else dict(color="#aaa", lw=0.9, ls=":")
        ax.plot([x_knee, hi], [peak / 1e9, peak / 1e9], **style)
        ax.text(hi, peak / 1e9, f" {d} {_fmt_rate(peak, 'FLOP/s')}", fontsize=8, va="center",
                ha="left", color=style["color"])
    top = max(machine.peak_flops.values())
    ax.plot([lo, top / bw], [lo * bw / 1e9, top / 1e9], color="#444", lw=1.6)
    ax.text(lo * 1.15, lo * bw / 1e9 * 1.5, f"memory (read) {_fmt_rate(bw, 'B/s')}", fontsize=8,
            rotation=0, color="#444", va="bottom")
    methods = sorted({p["method"] for p in pts})
    color = {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(methods)}
    for m in methods:
        mp = [p for p in pts if p["method"] == m]
        filled = [p for p in mp if not p["baseline"]]
        hollow = [p for p in mp if p["baseline"]]
        for group, face in ((filled, color[m]), (hollow, "none")):
            if group:
                ax.scatter([p["intensity"] for p in group], [p["achieved_flops"] / 1e9 for p in group],
                           s=34, facecolors=face, edgecolors=color[m], linewidths=1.3, zorder=3,
                           label=_tex_safe(m) + (" (baseline)" if face == "none" else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ys = [p["achieved_flops"] / 1e9 for p in pts] or [1.0]
    ax.set_ylim(10 ** math.floor(math.log10(min(min(ys), lo * bw / 1e9))), top / 1e9 * 3)
    ax.set_xlabel("arithmetic intensity (FLOP / byte of memory traffic)")
    ax.set_ylabel("achieved performance (GFLOP/s)")
    ax.set_title(_tex_safe(title), fontsize=11)
    ax.grid(True, which="major", color="#ddd", lw=0.6)
    if pts:  # below the axes: never over a point or a label
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13),
                  ncol=min(5, len(methods) + 1), frameon=False)
    _place_labels(ax, [(p["intensity"], p["achieved_flops"] / 1e9) for p in pts],
                  [f"{100 * p['efficiency']:.0f}%" for p in pts])
    return _svg(fig)


def efficiency_chart_svg(points: list[dict], title: str) -> str:
    """Horizontal bars: every placed row's efficiency (% of its roofline-attainable time), one
    bar per row, labelled with the row's config, method and the figure."""
    plt = _plt()
    pts = [p for p in points if not p.get("error")]
    n = max(1, len(pts))
    fig, ax = plt.subplots(figsize=(8.6, 0.9 + 0.26 * n), dpi=100)
    effs = [100 * p["efficiency"] for p in pts]
    names = [_tex_safe(f"{p['label']}  {p['method']}") for p in pts]
    colors = ["#bbb" if p["baseline"] else "#1f77b4" for p in pts]
    ys = list(range(len(pts)))[::-1]
    ax.barh(ys, effs, color=colors, height=0.7)
    for y, e, p in zip(ys, effs, pts):
        ax.text(e + 1, y, f"{e:.1f}% ({p['bound']})", va="center", fontsize=7.5)
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=7.5)
    ax.axvline(100, color="#444", lw=1, ls="--")
    ax.set_xlim(0, max([110.0] + [e * 1.25 for e in effs]))
    ax.set_xlabel("efficiency: roofline-attainable time / measured time (%)")
    ax.set_title(_tex_safe(title) + "  (blue: pykernels, grey: baselines)", fontsize=10)
    return _svg(fig)


# --------------------------------------------------------------------------------------------
# tables

def _machine_rows(machine: MachineProfile) -> list[tuple[str, str, str]]:
    src = machine.source
    rows = [(f"peak {d}", _fmt_rate(v, "OP/s" if d == "int8" else "FLOP/s"), src)
            for d, v in machine.peak_flops.items()]
    rows += [(f"memory {k}", _fmt_rate(v, "B/s"), src) for k, v in machine.mem_bandwidth.items()]
    if machine.mem_capacity:
        rows.append(("memory capacity", f"{machine.mem_capacity / 2**30:.1f} GiB", src))
    rows += [(f"cache {k}", f"{v / 2**10:.0f} KiB" if v < 2**20 else f"{v / 2**20:.0f} MiB", src)
             for k, v in machine.caches.items()]
    for path, d in machine.disk.items():  # bandwidths; other fields (e.g. "method": "o_direct") as text
        rows += [(f"disk {k} {path}", _fmt_rate(v, "B/s") if isinstance(v, (int, float)) and not isinstance(v, bool)
                  else str(v), src) for k, v in d.items()]
    rows += [(f"link {k}", _fmt_rate(v, "B/s"), src) for k, v in machine.links.items()]
    return rows


def _advice_dict(a) -> dict:
    return a.to_dict() if hasattr(a, "to_dict") else dict(a)


_REC_HEADS = ["topic", "choice", "predicted", "why"]


def _rec_cells(r: dict) -> list[str]:
    """A recommendation's table cells (HTML and Markdown alike)."""
    return [str(r.get("topic", "")), _choice_text(r.get("choice")),
            "-" if r.get("predicted_s") is None else f"{r['predicted_s'] * 1e3:.3f} ms", str(r.get("reason", ""))]


def _choice_text(choice) -> str:
    if isinstance(choice, dict):
        return ", ".join(f"{k}={v}" for k, v in choice.items())
    return str(choice)


def _analysis_rows(analyses) -> list[dict]:
    out = []
    for a in analyses or []:
        d = a.to_dict() if hasattr(a, "to_dict") else dict(a)
        out.append(d)
    return out


def _analysis_cells(d: dict) -> list[str]:
    return [str(d.get("model", "")), str(d.get("machine", "")), str(d.get("phase", "")),
            str(d.get("batch", "")), str(d.get("context", "")),
            f"{d.get('w_bits', '')}/{d.get('kv_bits', '')}",
            f"{d['time_s'] * 1e3:.2f}" if d.get("time_s") is not None else "-",
            f"{d['tokens_per_s']:.1f}" if d.get("tokens_per_s") is not None else "-",
            str(d.get("bound", "")),
            f"{d['kv_bytes_per_token']:,.0f}" if d.get("kv_bytes_per_token") is not None else "-",
            str(d.get("max_sequences", "-"))]


_ANALYSIS_HEADS = ["model", "machine", "phase", "batch", "context", "w/kv bits", "predicted ms",
                   "tokens/s", "bound", "KV bytes/token", "max sequences"]
_POINT_HEADS = ["suite", "config", "method", "measured ms", "attainable ms", "eff %", "bound",
                "FLOP/byte", "GB/s", "GFLOP/s"]


def _point_cells(p: dict) -> list[str]:
    if p.get("error"):
        return [p["group"], p["label"], p["method"], "-", "-", "-", p["error"], "-", "-", "-"]
    ai = p["intensity"]
    return [p["group"], p["label"], p["method"] + (" (baseline)" if p["baseline"] else ""),
            f"{p['seconds'] * 1e3:.3f}", f"{p['attainable_seconds'] * 1e3:.3f}",
            f"{100 * p['efficiency']:.1f}", p["bound"], "-" if ai is None else f"{ai:.3g}",
            f"{p['achieved_bw'] / 1e9:.2f}", f"{p['achieved_flops'] / 1e9:.2f}"]


def _targets(results) -> list[dict]:
    if isinstance(results, dict):
        if results.get("targets"):
            return list(results["targets"])
        return [dict(t, suite=s.get("name")) for s in results.get("suites", []) for t in s.get("targets", [])]
    return []


def _rows(results) -> list[dict]:
    if isinstance(results, dict):
        if "suites" in results:
            return [dict(r, group=s["name"]) for s in results["suites"] for r in s.get("rows", [])]
        return list(results.get("rows", []))
    if isinstance(results, Point):
        results = [results]
    rows = []
    for r in results:
        if isinstance(r, Point):  # a bare Point: its own time and cost
            rows.append({"label": r.name, "method": r.name, "seconds": r.seconds, "flops": r.flops,
                         "bytes": r.bytes, "dtype": r.dtype, "baseline": False})
        elif isinstance(r, dict):
            rows.append(r)
        else:
            raise TypeError(f"results: expected dicts (rows) or roofline.Point, got {type(r).__name__}")
    return rows


# --------------------------------------------------------------------------------------------
# writers

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1180px;
color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:0.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.85em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
.chart{margin:10px 0 22px} .chart svg{max-width:100%;height:auto}
.pass{color:#1a7f37;font-weight:600} .miss{color:#c62828;font-weight:600}
.src-measured{color:#1a7f37} .src-table{color:#8a6d00} .src-predicted{color:#5b3fa3}
.note{color:#555;font-size:0.9em}
"""


def _h(s) -> str:
    return html.escape(str(s))


def _html_table(heads: list[str], rows: list[list[str]], num_from: int = 99) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_h(h)}</th>" for h in heads) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td class=\"num\">{_h(c)}</td>" if i >= num_from
                                    else f"<td>{_h(c)}</td>" for i, c in enumerate(r)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _md_table(heads: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    return ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)] + \
        ["| " + " | ".join(r) + " |" for r in esc]


def _target_cells(t: dict) -> list[str]:
    return [str(t.get("suite", "")), f"{t.get('name', '')} {t.get('op', '')} {t.get('threshold', '')}",
            str(t.get("text", "")), str(t.get("status", "")), str(t.get("note") or "")]


def _status_class(status: str) -> str:
    return "pass" if status.startswith("PASS") else "miss" if status.startswith("MISS") else ""


def report(results, machine, out_dir: str, *, recommendations=(), analyses=(), title: str | None = None,
           statement: str | None = None, notes=(), extra_markdown: str | None = None) -> dict:
    """Write ``index.html``, ``report.md`` and ``report.json`` into ``out_dir``.

    Parameters
    ----------
    results : list of row dicts or ``Point``, or a dict
        Measured runs (see the module docstring for a row's keys). A dict with ``"suites"``
        (``bench.report``'s result: each suite ``{"name", "title", "rows", "targets", ...}``) or
        with ``"rows"`` is read as such; its ``targets`` go into the report, and the whole dict
        is stored at the top level of ``report.json``, the report's keys beside its own.
    machine : MachineProfile, HARDWARE name, or dict device -> either
        The roofs each device's rows are placed against.
    out_dir : str
        Created when missing; the three files are overwritten atomically.
    recommendations : iterable of ``roofline.advise.Advice`` or dicts with ``topic``,
        ``choice``, ``reason`` (and optionally ``predicted_s``)
    analyses : iterable of ``ModelAnalysis`` or their ``to_dict()``: predicted model times.
    title : str, optional
    statement : str, optional
        What ran where (e.g. "no GPU: CUDA and Triton kernels were not run"), shown at the top.
    notes : iterable of str
        Further lines for the page and the Markdown.
    extra_markdown : str, optional
        Appended to ``report.md`` (the benchmark's detailed tables).

    Returns
    -------
    dict with the paths: ``{"html", "markdown", "json"}``.
    """
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise ValueError(f"out_dir: expected a directory path, got {out_dir!r}")
    machines = _machines(machine)
    rows = _rows(results)
    points = collect_points(rows, machines)
    targets = _targets(results)
    recs = [_advice_dict(a) for a in recommendations or ()]
    ans = _analysis_rows(analyses)
    title = title or f"Roofline report: {', '.join(m.name for m in machines.values())}"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    os.makedirs(out_dir, exist_ok=True)

    # charts: one roofline per (device, family), one efficiency chart per suite
    charts = []
    for dev, m in machines.items():
        if not m.peak_flops:  # a memory-only machine: efficiency bars and tables, no roofline
            continue
        dev_pts = [p for p in points if not p.get("error") and (p["device"] == dev or len(machines) == 1)]
        for fam in dict.fromkeys(_family(p["group"]) for p in dev_pts):
            fp = [p for p in dev_pts if _family(p["group"]) == fam and p.get("flops")]
            if not fp:  # rows with bytes but no FLOPs have no place on a FLOP/s chart
                continue
            charts.append((f"Roofline: {fam} on {m.name} ({dev})",
                           roofline_chart_svg(fp, m, f"{fam} on {m.name} ({dev}): measured points, "
                                                     "labelled % of attainable")))
    eff_charts = []
    for g in dict.fromkeys(p["group"] for p in points if not p.get("error")):
        gp = [p for p in points if p["group"] == g and not p.get("error")]
        eff_charts.append((g, efficiency_chart_svg(gp, f"{g}: efficiency per row")))

    # ---- HTML
    H = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_h(title)}</title>",
         f"<style>{_CSS}</style></head><body>", f"<h1>{_h(title)}</h1>",
         f"<p class=\"note\">Generated {_h(stamp)} by roofline.report.</p>"]
    if statement:
        H.append(f"<p><b>What ran where:</b> {_h(statement)}</p>")
    H.append("<h2 id=\"sources\">Measured, predicted, table</h2><ul>"
             "<li><span class=\"src-measured\">measured</span>: kernel times in this report and the "
             "machine figures marked <i>measured</i> (roofline.probe on this machine).</li>"
             "<li><span class=\"src-table\">table</span>: datasheet figures from roofline.hardware "
             "(marked <i>table</i>).</li>"
             "<li><span class=\"src-predicted\">predicted</span>: the cost model: every row's "
             "attainable time (max of FLOPs / peak and bytes / bandwidth), model predictions "
             "(analyze_model) and the advisor's estimates.</li></ul>")
    H.append("<h2 id=\"machine\">Machine</h2>")
    for dev, m in machines.items():
        H.append(f"<h3>{_h(dev)}: {_h(m.name)} <span class=\"src-{_h(m.source)}\">({_h(m.source)})</span></h3>")
        H.append(_html_table(["figure", "value", "source"], [list(r) for r in _machine_rows(m)]))
        if m.notes:
            H.append(f"<p class=\"note\">{_h(m.notes)}</p>")
    if charts:
        H.append("<h2 id=\"roofline\">Roofline charts</h2><p class=\"note\">Each point is one measured "
                 "row placed at its counted FLOPs / bytes; its label is the % of the roofline-"
                 "attainable performance it reached. Filled: pykernels; hollow: baselines.</p>")
        for cap, svg in charts:
            H.append(f"<div class=\"chart\" data-chart=\"roofline\" title=\"{_h(cap)}\">{svg}</div>")
    if eff_charts:
        H.append("<h2 id=\"efficiency\">Efficiency per row</h2>")
        for g, svg in eff_charts:
            H.append(f"<div class=\"chart\" data-chart=\"efficiency\" title=\"{_h(g)}\">{svg}</div>")
    if targets:
        H.append("<h2 id=\"targets\">Targets</h2>")
        H.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in ("suite", "target", "figure", "status", "note"))
                 + "</tr>")
        for t in targets:
            c = _target_cells(t)
            H.append("<tr>" + "".join(f"<td>{_h(x)}</td>" for x in c[:3])
                     + f"<td class=\"{_status_class(c[3])}\">{_h(c[3])}</td><td>{_h(c[4])}</td></tr>")
        H.append("</table>")
    if recs:
        H.append("<h2 id=\"recommendations\">Recommendations (advisor)</h2>")
        H.append(_html_table(_REC_HEADS, [_rec_cells(r) for r in recs]))
    if ans:
        H.append("<h2 id=\"predictions\">Model predictions (analyze_model)</h2>")
        H.append(_html_table(_ANALYSIS_HEADS, [_analysis_cells(d) for d in ans], num_from=3))
    if points:
        H.append("<h2 id=\"rows\">Every measured row</h2>")
        H.append(_html_table(_POINT_HEADS, [_point_cells(p) for p in points], num_from=3))
    if notes:
        H.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_h(n)}</li>" for n in notes) + "</ul>")
    H.append("</body></html>")

    # ---- Markdown
    M = [f"# {title}", "", f"Generated {stamp} by `roofline.report`.", ""]
    if statement:
        M += [f"**What ran where:** {statement}", ""]
    M += ["Sources: *measured* = this run's timings and the machine probe; *table* = "
          "`roofline.hardware` datasheet figures; *predicted* = the cost model (attainable times, "
          "`analyze_model`, the advisor).", ""]
    for dev, m in machines.items():
        M += [f"## Machine {dev}: {m.name} ({m.source})", ""] + \
            _md_table(["figure", "value", "source"], [list(r) for r in _machine_rows(m)]) + [""]
    if targets:
        M += ["## Targets", ""] + _md_table(["suite", "target", "figure", "status", "note"],
                                            [_target_cells(t) for t in targets]) + [""]
    if recs:
        M += ["## Recommendations (advisor)", ""] + _md_table(_REC_HEADS, [_rec_cells(r) for r in recs]) + [""]
    if ans:
        M += ["## Model predictions (analyze_model)", ""] + \
            _md_table(_ANALYSIS_HEADS, [_analysis_cells(d) for d in ans]) + [""]
    if points:
        M += ["## Every measured row on the roofline", ""] + \
            _md_table(_POINT_HEADS, [_point_cells(p) for p in points]) + [""]
    M += [f"- {n}" for n in notes]
    if extra_markdown:
        M += ["", extra_markdown]

    # a results dict (bench.report's) stays at the top level, the report's keys beside it
    doc = dict(results) if isinstance(results, dict) else {"rows": rows}
    doc.update({"title": title, "generated": stamp, "statement": statement,
                "machines": {dev: m.to_dict() for dev, m in machines.items()},
                "points": points, "targets": targets, "recommendations": recs, "analyses": ans,
                "report_notes": list(notes)})
    paths = {"html": os.path.join(out_dir, "index.html"), "markdown": os.path.join(out_dir, "report.md"),
             "json": os.path.join(out_dir, "report.json")}
    _write(paths["html"], "\n".join(H))
    _write(paths["markdown"], "\n".join(M) + "\n")
    _write(paths["json"], json.dumps(_jsonable(doc), indent=1, allow_nan=False))
    return paths


def _jsonable(x):
    """Strict JSON: numpy scalars as numbers, non-finite floats as null, other objects as str."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", None) == 0:
        x = x.item()  # numpy / torch scalar
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


def _write(path: str, text: str) -> None:
    """Write via a temporary file and rename: a crash never leaves a half-written report."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:  # the page declares utf-8, whatever the locale
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
