"""Collect a merge's grid into grid.tsv and grid.png (rule collect_grid)."""
from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

import json
from pathlib import Path

from remerge.workflow.grid import write_grid

inp, p = snakemake.input, snakemake.params
load = lambda path: json.loads(Path(path).read_text())
points = list(p.points)
write_grid(
    merge=p.merge,
    points=p.points,
    scores={pt: load(f) for pt, f in zip(points, inp.scores)},
    digests={pt: load(f)["digest"] for pt, f in zip(points, inp.tensors)},
    references={m: load(f) for m, f in zip(p.references, inp.references)},
    table_path=snakemake.output.table,
    plot_path=snakemake.output.plot,
)
