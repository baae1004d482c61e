#!/usr/bin/env python3
"""What an audit costs next to the merge it checks: `remerge audit` of a merge against
`remerge merge` of the same recipe, each a whole fresh process, on synthetic Llama-shaped
models (bench/synthetic_models.py).

An audit re-computes every tensor with the merge's own function and compares it with the
published one (random methods: checks every element against the values the recipe allows),
so it should read each input once and the published model once, hold one tensor's working
set, and write nothing but its report: its time should be close to the merge's, its memory
no larger.

    .venv/bin/python bench/audit_cost.py --params 300M --recipes seed,ties3,dare_ties --repeat 2

Nothing here imports the remerge package: it runs its command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from measure import measure  # noqa: E402
from merge_speed import recipe_text  # noqa: E402
from synthetic_models import ensure_models, parse_size, size_tag  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="300M", help="model size (e.g. 75M, 300M)")
    p.add_argument("--recipes", default="seed,ties3,dare_ties",
                   help="comma-separated recipes of bench/merge_speed.py")
    p.add_argument("--repeat", type=int, default=1, help="runs of each, alternating")
    p.add_argument("--out", type=Path, default=HERE / "out", help="models and runs go here")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    remerge = str(Path(sys.executable).with_name("remerge"))
    params = parse_size(args.params)
    folders = ensure_models(args.out / "models" / size_tag(params), 0, params, 2)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    rows = []
    for kind in args.recipes.split(","):
        run = args.out / "audit-runs" / size_tag(params) / kind
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        (run / "recipe.yml").write_text(recipe_text(kind, folders))
        merged, report = run / "merged", run / "audit"
        times: dict[str, list[dict]] = {"merge": [], "audit": []}
        for i in range(args.repeat):
            shutil.rmtree(merged, ignore_errors=True)
            times["merge"].append(measure([remerge, "merge", str(run / "recipe.yml"), str(merged)],
                                          run / f"merge-{i}.log", env, args.cold))
            shutil.rmtree(report, ignore_errors=True)
            times["audit"].append(measure([remerge, "audit", str(merged), str(report)],
                                          run / f"audit-{i}.log", env, args.cold))
        verdict = json.loads((report / "audit.json").read_text())["verdict"]
        row = {"recipe": kind, "verdict": verdict}
        for tool, runs in times.items():
            row[f"{tool}_wall_s"] = statistics.median(r["wall_s"] for r in runs)
            row[f"{tool}_peak_rss_mb"] = max(r["peak_rss_bytes"] for r in runs) / 1e6
            row[f"{tool}_rc"] = [r["rc"] for r in runs]
        row["audit_over_merge"] = row["audit_wall_s"] / row["merge_wall_s"]
        rows.append(row)
    print(f"| recipe ({args.params}) | merge s | audit s | audit / merge | merge peak MB | audit peak MB | verdict |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['merge_wall_s']:.2f} | {r['audit_wall_s']:.2f} | "
              f"{r['audit_over_merge']:.2f} | {r['merge_peak_rss_mb']:.0f} | {r['audit_peak_rss_mb']:.0f} | {r['verdict']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
