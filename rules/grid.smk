# The grid's table and picture: every task over density x weight, references beside it.


rule collect_grid:
    input:
        scores=lambda wc: expand(
            paths.SCORES,
            merge=wc.merge,
            point=points(wc.merge),
        ),
        tensors=lambda wc: expand(
            paths.TENSORS,
            merge=wc.merge,
            point=points(wc.merge),
        ),
        references=lambda wc: expand(paths.REFERENCE_SCORES, model=reference_models()),
    output:
        table=report(
            paths.GRID_TABLE,
            caption="../report/grid_table.rst",
            category="Grids",
            labels={"merge": "{merge}", "figure": "table"},
        ),
        plot=report(
            paths.GRID_PLOT,
            caption="../report/grid_plot.rst",
            category="Grids",
            labels={"merge": "{merge}", "figure": "heatmaps"},
        ),
    log:
        "logs/{merge}/collect_grid.log",
    conda:
        "../envs/remerge.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        points=lambda wc: {p: point_values_of(wc.merge, p) for p in points(wc.merge)},
        references=lambda wc: reference_models(),
        merge=lambda wc: wc.merge,
    script:
        "../scripts/collect_grid.py"
