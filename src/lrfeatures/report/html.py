"""The tables of the report and its self-contained HTML page (figures embedded as PNG data URIs)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..analysis.findings import FAILS, HOLDS, build_findings
from ..analysis.tables import swa_k_of_choice
from ..config import dump_toml
from ..errors import DataError
from .bands import band_normalization, band_order, band_rows
from .figures import all_captions
from .load import Experiment, feature_summary, over_seeds
from .style import REGIME_COLORS


def format_number(value: float | None, digits: int = 3) -> str:
    """`value` with `digits` decimals, '–' when missing or not finite."""
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def mean_std_text(stats: pd.DataFrame, plr: float) -> str:
    """'mean ± std' of an `over_seeds` table at one PLR ('mean' alone for one seed, '–' for none)."""
    row = stats[np.isclose(stats["plr"], plr)]
    if row.empty or not np.isfinite(row["mean"].iloc[0]):
        return "–"
    std = row["std"].iloc[0]
    return format_number(row["mean"].iloc[0]) + ("" if not np.isfinite(std) else f" ± {format_number(std)}")


def _regime_name(regime) -> str:
    return regime if isinstance(regime, str) and regime else "–"


VOTES = ("1", "2", "2A", "2B", "3")


def vote_text(info: pd.Series) -> str:
    """The PLR's seed vote shares, e.g. '2A 0.75 · 2B 0.25' ('–' for summaries without them)."""
    shares = [(name, info.get(f"frac_{name}")) for name in VOTES]
    shares = [(name, float(v)) for name, v in shares if v is not None and pd.notna(v) and float(v) > 0]
    return " · ".join(f"{name} {share:.2f}" for name, share in shares) or "–"


def regime_table(exp: Experiment) -> pd.DataFrame:
    """Per PLR: regime, confidence, seed votes, diverged runs, test acc after PT / best FT / SWA, PT sparsity.

    The sparsity column is there only when the experiment has feature probes (features.parquet).
    """
    table = exp.regimes.table.set_index("plr")
    plrs = sorted(set(table.index) | set(exp.evaluations["plr"].unique()))
    pre = over_seeds(exp.stage("pretrain"), ["plr"], "test_acc")
    finetune = exp.stage("finetune")
    best_ft = (over_seeds(finetune, ["plr", "flr"], "test_acc").sort_values("mean", ascending=False)
               .drop_duplicates("plr") if not finetune.empty else None)
    swa_rows = exp.stage("swa")
    k = swa_k_of_choice(swa_rows["swa_k"].unique())  # the K the geometry figure's SWA model has
    swa = over_seeds(swa_rows[swa_rows["swa_k"] == k], ["plr"], "test_acc") if k is not None else None
    try:
        sparsity = feature_summary(exp).query("stage == 'pretrain'")
        sparsity = sparsity.rename(columns={"sparsity_mean": "mean", "sparsity_std": "std"})
    except DataError:
        sparsity = None
    basis = sparsity["basis"].iloc[0] if sparsity is not None and len(sparsity) else "margin"
    rows = []
    for plr in plrs:
        info = table.loc[plr] if plr in table.index else pd.Series(dtype=object)
        n_seeds, n_div = info.get("n_seeds"), info.get("n_diverged")
        best = "–"
        if best_ft is not None:
            match = best_ft[np.isclose(best_ft["plr"], plr)]
            if len(match) and np.isfinite(match["mean"].iloc[0]):
                best = f"{format_number(match['mean'].iloc[0])} (FLR {match['flr'].iloc[0]:.3g})"
        row = {
            "PLR": f"{plr:.3g}",
            "regime": _regime_name(info.get("regime")),
            "confidence": format_number(info.get("confidence", np.nan), 2),
            "seed votes": vote_text(info),
            "diverged runs": "–" if n_seeds is None or pd.isna(n_seeds) else f"{int(n_div)}/{int(n_seeds)}",
            "test acc after PT": mean_std_text(pre, plr),
            "best FT (max over FLRs)": best,
            f"SWA K={k}" if k is not None else "SWA": mean_std_text(swa, plr) if swa is not None else "–",
        }
        if sparsity is not None:
            row[f"sparsity after PT ({basis})"] = mean_std_text(sparsity, plr)
        rows.append(row)
    return pd.DataFrame(rows)


def findings_table(exp: Experiment) -> pd.DataFrame:
    """One row per claim of summary.json's findings (built now from the summary where it has none)."""
    findings = exp.summary.get("findings") or build_findings(exp.summary)
    rows = [{"claim": key, "what the paper says": f["claim"],
             "numbers": ", ".join(f"{k} {format_number(v)}" for k, v in f["numbers"].items()),
             "verdict": f["verdict"], "rule": f["rule"]} for key, f in findings.items()]
    return pd.DataFrame(rows, columns=["claim", "what the paper says", "numbers", "verdict", "rule"])


def boundary_table(exp: Experiment) -> pd.DataFrame:
    """One row per boundary name: estimate, lower/upper PLR, margin (decades), confidence."""
    rows = []
    for name, b in exp.regimes.boundaries.items():
        b = b or {}
        cell = lambda key, fmt: "–" if b.get(key) is None else format(b[key], fmt)  # noqa: E731
        rows.append({"boundary": name, "estimate": cell("estimate", ".3g"),
                     "lower PLR": cell("lower_plr", ".3g"), "upper PLR": cell("upper_plr", ".3g"),
                     "margin (decades)": cell("margin", ".2f"), "confidence": cell("confidence", ".2f")})
    return pd.DataFrame(rows, columns=["boundary", "estimate", "lower PLR", "upper PLR",
                                       "margin (decades)", "confidence"])


def band_table(exp: Experiment) -> pd.DataFrame:
    """Per PLR: regime and the pre-trained models' keep- and remove-band accuracy (mean ± std) per band."""
    bands = band_rows(exp)
    pre = bands[bands["stage"] == "pretrain"]
    regimes = exp.regimes.table
    rows = []
    for plr in sorted(pre["plr"].unique()):
        match = regimes[np.isclose(regimes["plr"], plr)]
        row = {"PLR": f"{plr:.3g}", "regime": _regime_name(match["regime"].iloc[0] if len(match) else None)}
        for mode in ("keep", "remove"):
            for name, _, _ in band_order(bands):
                stats = over_seeds(pre[(pre["mode"] == mode) & (pre["band"] == name)], ["plr"], "accuracy")
                row[f"{mode} {name}"] = mean_std_text(stats, plr)
        rows.append(row)
    return pd.DataFrame(rows)


VERDICT_COLORS = {HOLDS: "#2ca02c", FAILS: "#d62728"}


def html_table(table: pd.DataFrame, regime_column: str | None = None) -> str:
    """An escaped HTML table; cells of `regime_column` get their regime colour, verdicts theirs."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = []
    for _, row in table.iterrows():
        cells = []
        for column, value in row.items():
            style = ""
            color = REGIME_COLORS.get(value) if column == regime_column else \
                VERDICT_COLORS.get(value) if column == "verdict" else None
            if color:
                style = f' style="color:{color};font-weight:bold"'
            cells.append(f"<td{style}>{html.escape(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1320px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } .meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1.5em 0 2.5em; } figure img { max-width: 100%; height: auto; }
figcaption { color: #444; font-size: 0.95em; margin-top: 0.4em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.note { color: #8a5300; }
"""


def render_html(exp: Experiment, figures: dict[str, Path | str]) -> str:
    """The self-contained page (figures as PNG data URIs); `figures` maps name -> PNG path or skip reason."""
    esc = html.escape
    name = exp.summary.get("name") or getattr(exp.config, "name", exp.root.name)
    parts = [f"<h1>lrfeatures report: {esc(str(name))}</h1>",
             f"<p class='meta'>report by lrfeatures {esc(__version__)}; summary.json by lrfeatures "
             f"{esc(str(exp.summary.get('version') or '– (none)'))}; directory {esc(str(exp.root))}</p>",
             "<p>Figures rebuilt from the stored tables, without retraining. Dashed lines mark the detected "
             "regime boundaries (grey: the PLR gap each lies in); the regimes are 1 (convergence), 2A/2B "
             "(chaotic equilibrium, sparse / not sparse) and 3 (divergence).</p>"]
    parts += [f"<p class='note'>{esc(note)}</p>" for note in exp.notes]
    if "findings" not in exp.summary:
        parts.append("<p class='note'>summary.json has no findings block (written before 0.2): the findings "
                     "below were computed now from its per-PLR numbers.</p>")
    parts += ["<h2>Findings</h2>", "<p>Each claim of the paper, judged by the rule shown on this "
              "experiment's numbers (the tables below) (see <code>lrfeatures.analysis.findings</code>).</p>",
              html_table(findings_table(exp)),
              "<h2>Regimes per PLR</h2>", html_table(regime_table(exp), regime_column="regime"),
              "<h2>Regime boundaries</h2>", html_table(boundary_table(exp))]
    if exp.bands is not None:
        parts += [f"<h2>Band accuracy after pre-training (normalization: {esc(band_normalization(exp))})</h2>",
                  "<p>Test accuracy with only one frequency band kept, and with one band removed "
                  "(mean ± std over seeds); see <code>bands.parquet</code>.</p>",
                  html_table(band_table(exp), regime_column="regime")]
    parts.append("<h2>Figures</h2>")
    captions = all_captions()
    for key, result in figures.items():
        if isinstance(result, Path):
            data = base64.b64encode(result.read_bytes()).decode("ascii")
            parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{esc(key)}'><figcaption>"
                         f"<b>{esc(key)}.png</b>: {esc(captions.get(key, ''))}</figcaption></figure>")
        else:
            parts.append(f"<p class='note'><b>{esc(key)}.png</b> not drawn: {esc(str(result))}</p>")
    parts += ["<h2>Resolved config</h2>", f"<pre>{esc(dump_toml(exp.config))}</pre>"]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(str(name))}: lrfeatures report</title><style>{CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")
