"""Build the offline demo's base and instruct models (rule build_demo_models)."""
from remerge.logs import to_file

to_file(snakemake.log[0])

from pathlib import Path

from remerge.demo import build_demo_models

build_demo_models(Path(snakemake.params.out_dir), seed=snakemake.params.seed)
