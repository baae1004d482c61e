"""Audit a published merge against its recipe (rule audit_model); any verdict is a result."""
from remerge.workflow.logs import to_file

to_file(snakemake.log[0])

from pathlib import Path

from remerge.provenance.audit import run_audit

p = snakemake.params
run_audit(p.published, p.recipe, p.path_map, p.transplant_from, p.version, p.models_dir,
          Path(snakemake.output.report).parent)
