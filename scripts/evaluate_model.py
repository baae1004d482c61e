"""Evaluate a merged or reference model with lm-eval (rules evaluate_model, evaluate_reference)."""
import os

from remerge.workflow.logs import to_file

to_file(snakemake.log[0])
# Read by huggingface_hub / datasets at import: set before anything imports them.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if snakemake.params.offline:  # local tasks only: never wait on the network
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from remerge.evaluation.run import evaluate_and_score

p = snakemake.params
evaluate_and_score(
    model_dir=p.model_dir,
    manifest=snakemake.input.get("manifest"),
    settings=p.settings,
    samples_dir=p.samples,
    results_path=snakemake.output.results,
    scores_path=snakemake.output.scores,
)
