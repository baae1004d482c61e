"""Evaluate a merged or reference model with lm-eval (rules evaluate_model, evaluate_reference)."""
from remerge.logs import to_file

to_file(snakemake.log[0])

from remerge.jobs import evaluate_and_score

p = snakemake.params
evaluate_and_score(
    model_dir=p.model_dir,
    manifest=snakemake.input.get("manifest"),
    settings=p.settings,
    samples_dir=p.samples,
    results_path=snakemake.output.results,
    scores_path=snakemake.output.scores,
)
