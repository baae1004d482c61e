"""`remerge grid MERGE_DIR`: collect a grid's scores into grid.tsv and grid.png.

MERGE_DIR is laid out as the workflow's `results/<merge>/`: one folder per grid point, named
by its values (`density~0.5/weight~1.0`, or `single` without a grid), each holding the
point's scores.json (`remerge scores --out`) and tensors.json (`remerge assemble --tensors`).
The table has a row per point, then one per `--reference` model; the picture a heatmap per
score over the grid's keys (the last key across).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from remerge.commands.card import pair, read_json
from remerge.errors import ModelError

SINGLE_POINT = "single"  # the one point of a merge without a grid (as the workflow names it)
SCORES_NAME, TENSORS_NAME = "scores.json", "tensors.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("merge_dir", type=Path, metavar="MERGE_DIR",
                   help="the merge's folder: <key~value/...>/scores.json and tensors.json per point")
    p.add_argument("--reference", type=pair, action="append", default=[], metavar="NAME=FILE",
                   help="a reference model's scores.json, shown beside the grid (repeatable)")
    p.add_argument("--name", default=None, help="the merge's name (default: MERGE_DIR's name)")
    p.add_argument("--table", type=Path, default=None, metavar="FILE",
                   help="the table to write (default: MERGE_DIR/grid.tsv)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE",
                   help="the picture to write (default: MERGE_DIR/grid.png)")


def point_values(point: str) -> dict[str, str] | None:
    """{key: value} of a point folder name, or None for a folder that names no point."""
    if point == SINGLE_POINT:
        return {}
    parts = [part.partition("~") for part in point.split("/")]
    if not all(key and sep and value for key, sep, value in parts):
        return None
    return {key: value for key, _, value in parts}


def _order(values: dict[str, str]) -> tuple:
    return tuple((0, float(v), v) if _is_number(v) else (1, 0.0, v) for v in values.values())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def find_points(merge_dir: Path) -> dict[str, dict[str, str]]:
    """{point folder: values} for every point folder with a scores.json, in grid order."""
    if not merge_dir.is_dir():
        raise ModelError(f"{merge_dir}: no such folder; give a merge's results folder")
    points = {}
    for scores in merge_dir.rglob(SCORES_NAME):
        point = scores.parent.relative_to(merge_dir).as_posix()
        values = point_values(point)
        if values is not None:
            points[point] = values
    if not points:
        raise ModelError(f"{merge_dir}: no grid point with a {SCORES_NAME} (expected "
                         f"{merge_dir}/<key~value/...>/{SCORES_NAME} or {merge_dir}/{SINGLE_POINT}/"
                         f"{SCORES_NAME}); run `remerge scores --out` for each point")
    keys = {tuple(values) for values in points.values()}
    if len(keys) > 1:
        raise ModelError(f"{merge_dir}: its points have different keys ({sorted(keys)}); "
                         "a grid's points all have the same keys, in the same order")
    return dict(sorted(points.items(), key=lambda item: _order(item[1])))


def read_scores(path: Path) -> dict:
    fix = "write it with `remerge scores --out`"
    scores = read_json(path, "scores file", fix)
    if not isinstance(scores, dict):
        raise ModelError(f"{path}: not a scores file (a JSON object); {fix}")
    return scores


def run(args: argparse.Namespace) -> int:
    from remerge.workflow.grid import write_grid  # matplotlib

    merge_dir = args.merge_dir
    points = find_points(merge_dir)
    scores = {p: read_scores(merge_dir / p / SCORES_NAME) for p in points}
    digests = {}
    for p in points:
        tensors = read_json(merge_dir / p / TENSORS_NAME, "tensors record",
                            "write it with `remerge assemble --tensors`")
        if not isinstance(tensors, dict) or "digest" not in tensors:
            raise ModelError(f"{merge_dir / p / TENSORS_NAME}: no tensors digest; write it with "
                             "`remerge assemble --tensors`")
        digests[p] = tensors["digest"]
    references = {name: read_scores(Path(path)) for name, path in args.reference}
    table = args.table or merge_dir / "grid.tsv"
    plot = args.plot or merge_dir / "grid.png"
    for path in (table, plot):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_grid(args.name or merge_dir.absolute().name, points, scores, digests, references, table, plot)
    print(f"{table}, {plot}: {len(points)} point(s), {len(references)} reference(s)")
    return 0
