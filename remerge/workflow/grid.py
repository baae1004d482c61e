"""A merge's grid at a glance: `grid.tsv` (one row per point) and `grid.png` (one heatmap per
task over the grid's two axes, with the reference models' scores beside each)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

from remerge.io.files import write_bytes_atomic, write_text_atomic

MAIN_METRICS = ("acc", "acc_norm", "exact_match")


def score_columns(scores: Mapping[str, Any]) -> dict[str, float | None]:
    """One number per column, in percent: the leaderboard's normalized benchmarks when
    present, else each task's main metric (acc, acc_norm, exact_match, else the first)."""
    if scores.get("leaderboard"):
        return {f"{k} (normalized)": v for k, v in scores["leaderboard"].items()}
    columns: dict[str, float | None] = {}
    for task, metrics in sorted(scores.get("tasks", {}).items()):
        metric = next((m for m in MAIN_METRICS if m in metrics), next(iter(sorted(metrics)), None))
        if metric is not None:
            columns[f"{task} {metric}"] = 100 * metrics[metric]
    return columns


def grid_rows(
    points: Mapping[str, Mapping[str, str]], scores: Mapping[str, Mapping[str, Any]],
    digests: Mapping[str, str], references: Mapping[str, Mapping[str, Any]],
) -> tuple[list[str], list[dict[str, Any]]]:
    """The table: grid points first (in grid order), then the references."""
    keys = list(next(iter(points.values()), {}))
    columns: list[str] = []
    rows = []
    for point, values in points.items():
        cols = score_columns(scores[point])
        columns += [c for c in cols if c not in columns]
        rows.append({"kind": "merge", "point": point, **values, **cols, "tensors_digest": digests[point]})
    for name, ref_scores in references.items():
        cols = score_columns(ref_scores)
        columns += [c for c in cols if c not in columns]
        rows.append({"kind": "reference", "point": name, **cols, "tensors_digest": ""})
    return ["kind", "point", *keys, *columns, "tensors_digest"], rows


def tsv_text(header: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(header), delimiter="\t", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in header})
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return "NA"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def plot_grid(
    merge: str, keys: Sequence[str], header: Sequence[str], rows: Sequence[Mapping[str, Any]],
) -> bytes:
    """PNG bytes: one heatmap per score column; y = all but the last grid key, x = the last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    score_cols = [c for c in header if c not in ("kind", "point", "tensors_digest", *keys)]
    merges = [r for r in rows if r["kind"] == "merge"]
    refs = [r for r in rows if r["kind"] == "reference"]
    x_key = keys[-1] if keys else None
    y_keys = list(keys[:-1])
    xs = list(dict.fromkeys(r[x_key] for r in merges)) if x_key else ["single"]
    ys = list(dict.fromkeys(tuple(r[k] for k in y_keys) for r in merges)) or [()]
    n = max(1, len(score_cols))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 1.2 + 0.55 * len(ys) + 1.4), squeeze=False)
    for ax, col in zip(axes[0], score_cols):
        grid = np.full((len(ys), len(xs)), np.nan)
        for r in merges:
            yi = ys.index(tuple(r[k] for k in y_keys))
            xi = xs.index(r[x_key]) if x_key else 0
            grid[yi, xi] = np.nan if r.get(col) is None else r[col]
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for (yi, xi), v in np.ndenumerate(grid):
            ax.text(xi, yi, "NA" if np.isnan(v) else f"{v:.1f}", ha="center", va="center",
                    color="white" if np.isnan(v) or v < 60 else "black", fontsize=9)
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_yticks(range(len(ys)), ["/".join(y) or merge for y in ys])
        ax.set_xlabel(x_key or "")
        ax.set_ylabel("/".join(y_keys))
        ref_text = ", ".join(f"{r['point']}: {_cell(r.get(col))}" for r in refs)
        ax.set_title(f"{col}\nreferences: {ref_text or 'none'}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{merge}: scores (percent) over the grid", fontsize=11)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return out.getvalue()


def write_grid(
    merge: str, points: Mapping[str, Mapping[str, str]], scores: Mapping[str, Mapping[str, Any]],
    digests: Mapping[str, str], references: Mapping[str, Mapping[str, Any]],
    table_path: str | Path, plot_path: str | Path,
) -> None:
    header, rows = grid_rows(points, scores, digests, references)
    keys = list(next(iter(points.values()), {}))
    write_text_atomic(table_path, tsv_text(header, rows))
    write_bytes_atomic(plot_path, plot_grid(merge, keys, header, rows))
