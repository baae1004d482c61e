"""Build the offline demo's base and instruct models (rule build_demo_models)."""
from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

import shutil
from pathlib import Path

from remerge.demo.models import build_demo_models

out_dir = Path(snakemake.params.out_dir)
for stale in sorted(out_dir.glob(".demo-*")):  # the staging folder of a killed earlier build
    shutil.rmtree(stale, ignore_errors=True)
build_demo_models(out_dir, seed=snakemake.params.seed)
