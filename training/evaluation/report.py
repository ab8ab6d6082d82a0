"""Results table (Markdown + CSV) and plot in the column order of the paper's comparison table.

The first seven CSV columns are always ``method, CLIP-T, CLIP-I, DINO, FaceSim, FGIS, FID`` so
that rows of different runs, and rows typed in from the papers (``--extra-rows``), line up.  The
CSV holds raw values (cosines in -1..1); ``percent`` only changes the Markdown and the plot.
"""

from __future__ import annotations

import csv
import logging
import math
import os

from consistentid_core.errors import EvaluationError
from consistentid_core.face.labels import GROUP_ORDER

logger = logging.getLogger("consistentid.evaluate")

METRICS = ("CLIP-T", "CLIP-I", "DINO", "FaceSim", "FGIS", "FID")
LOWER_IS_BETTER = {"FID"}
DIAGNOSTICS = ("images", "identities", "no_face", "no_shared_region", "copy_paste", "copy_paste_images") + tuple(
    f"fgis_{g}" for g in GROUP_ORDER) + ("facesim_model", "dino_model", "clip_model", "fid_features", "fid_note")
CSV_COLUMNS = ("method",) + METRICS + DIAGNOSTICS


def _number(value) -> float | None:
    if value is None or value == "":
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _shown(metric: str, value, percent: bool) -> str:
    value = _number(value)
    if value is None:
        return "–"
    if metric in LOWER_IS_BETTER:
        return f"{value:.2f}"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def _count(value) -> str:
    return "–" if value in (None, "") else str(value)


def read_rows(path) -> list[dict]:
    """Rows of an earlier results.csv (or a hand-made one with at least method + metric columns)."""
    if not os.path.isfile(path):
        raise EvaluationError(f"extra-rows file {path} does not exist")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "method" not in rows[0]:
        raise EvaluationError(f"{path} needs a 'method' column and metric columns {', '.join(METRICS)}")
    return [{k: v for k, v in row.items() if k in CSV_COLUMNS} for row in rows]


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})


def markdown(rows: list[dict], percent: bool = False) -> str:
    arrows = [f"{m} {'↓' if m in LOWER_IS_BETTER else '↑'}" for m in METRICS]
    lines = ["| Method | " + " | ".join(arrows) + " |", "|---|" + "---:|" * len(METRICS)]
    for row in rows:
        lines.append(f"| {row['method']} | " + " | ".join(_shown(m, row.get(m), percent) for m in METRICS) + " |")
    measured = [r for r in rows if r.get("images") not in (None, "")]
    if measured:
        lines += ["", "| Method | images | no face | no shared region | copy-paste | "
                  + " | ".join(f"FGIS {g}" for g in GROUP_ORDER) + " |",
                  "|---|" + "---:|" * (4 + len(GROUP_ORDER))]
        for row in measured:
            copy = _shown("copy", row.get("copy_paste"), percent)
            if row.get("copy_paste_images") not in (None, "", 0):
                copy += f" (n={row['copy_paste_images']})"
            lines.append(
                f"| {row['method']} | {row['images']} | {_count(row.get('no_face'))} | "
                f"{_count(row.get('no_shared_region'))} | "
                f"{copy} | " + " | ".join(_shown('FGIS', row.get(f'fgis_{g}'), percent) for g in GROUP_ORDER) + " |")
    notes = []
    for row in measured:
        models = ", ".join(f"{k.split('_')[0]}: {row[k]}" for k in ("facesim_model", "dino_model", "clip_model",
                                                                     "fid_features") if row.get(k))
        fid_note = f"; FID: {row['fid_note']}" if row.get("fid_note") else ""
        notes.append(f"- {row['method']}: {models}{fid_note}")
    scale = "×100" if percent else "raw cosines"
    lines += ["", f"Similarities are {scale}; FID uses a local feature extractor, not Inception-v3."] + notes
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, percent: bool = False) -> None:
    """One horizontal bar chart per metric, a bar per method; missing values are marked n/a."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(r["method"]) for r in rows]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.0 * len(METRICS), 0.6 * len(rows) + 1.6), sharey=True)
    for ax, metric in zip(axes, METRICS):
        scale = 100.0 if percent and metric not in LOWER_IS_BETTER else 1.0
        values = [_number(r.get(metric)) for r in rows]
        heights = [0.0 if v is None else v * scale for v in values]
        bars = ax.barh(range(len(rows)), heights, color=["#4c72b0" if v is not None else "#dddddd" for v in values])
        for bar, value, shown in zip(bars, values, heights):
            label = "n/a" if value is None else f"{shown:.3g}"
            ax.annotate(label, (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=8)
        ax.set_title(f"{metric} {'↓' if metric in LOWER_IS_BETTER else '↑'}")
        ax.margins(x=0.3)
    axes[0].set_yticks(range(len(rows)), names)
    axes[0].invert_yaxis()  # first row of the table at the top, as in the table
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(rows: list[dict], out_dir, percent: bool = False, stem: str = "results") -> dict[str, str]:
    """results.md, results.csv and results.png in ``out_dir``; returns their paths."""
    if not rows:
        raise EvaluationError("no results to write")
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("md", "csv", "png")}
    with open(paths["md"], "w", encoding="utf-8") as fh:
        fh.write(markdown(rows, percent))
    write_csv(rows, paths["csv"])
    plot(rows, paths["png"], percent)
    logger.info("wrote %s", ", ".join(paths.values()))
    return paths
