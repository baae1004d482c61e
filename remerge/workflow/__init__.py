"""What the Snakemake workflow needs, without Snakemake: config validation, every results path, resources, grids, job logs."""
