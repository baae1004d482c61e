"""Every path the workflow writes under results/: the one place that spells them.

Each constant is a Snakemake pattern (`{merge}`, `{point}`, `{shard}`, `{model}`, `{audit}`
are wildcards); the rules use the patterns as they are, and input functions fill them with
`str.format` (`path(SHARD, merge=..., point=..., shard=...)`). Logs and benchmarks mirror
these paths under logs/ and benchmarks/ (spelled in each rule, next to its outputs).

    results/models/<model>/manifest.json        every input model (hub download, local folder, demo)
    results/demo/{base,instruct}/               the demo models
    results/<merge>/plan.json                   the shard plan, shared by every grid point
    results/<merge>/<point>/model/              the merged model folder
    results/<merge>/<point>/...                 digests, tensors.json, configs.json, eval, scores, provenance
    results/<merge>/single/manifest.json        a merge another merge reads (a chain's stage): its files
    results/<merge>/grid.tsv, grid.png          the grid's table and picture
    results/references/<model>/...             evaluations of the input models
    results/audits/<audit>/audit.json, .md      audits of published merges
"""

from __future__ import annotations

RESULTS = "results"

# input models
MODEL_RECORD = "results/models/{model}"  # a hub download's folder (snapshot/, listings, manifest)
MANIFEST = MODEL_RECORD + "/manifest.json"
HUB_SNAPSHOT = MODEL_RECORD + "/snapshot"  # the downloaded files
DEMO_DIR = "results/demo"
DEMO_MODEL = DEMO_DIR + "/{name}"  # {name}: base | instruct

# a merge and its grid points ({point}: `density~0.5/weight~1.0`, or `single`)
PLAN = "results/{merge}/plan.json"
POINT = "results/{merge}/{point}"
MODEL_DIR = POINT + "/model"
SHARD = MODEL_DIR + "/{shard}.safetensors"  # {shard}: the file name without .safetensors
INDEX = MODEL_DIR + "/model.safetensors.index.json"
RECIPE = MODEL_DIR + "/mergekit_config.yml"
CONFIG = MODEL_DIR + "/config.json"
CARD = MODEL_DIR + "/README.md"
DIGESTS = POINT + "/digests/{shard}.json"  # sha256 of each tensor of one shard
TENSORS = POINT + "/tensors.json"  # every tensor's sha256 and their digest
CONFIGS = POINT + "/configs.json"  # which json/tokenizer file came from which model
PROVENANCE = POINT + "/provenance.json"
STAGE_MANIFEST = POINT + "/manifest.json"  # the model folder's files, for a merge that reads it
EVAL_RESULTS = POINT + "/eval/results.json"  # lm-eval's full results
EVAL_SAMPLES = POINT + "/eval/samples"
SCORES = POINT + "/scores.json"
GRID_TABLE = "results/{merge}/grid.tsv"
GRID_PLOT = "results/{merge}/grid.png"

# evaluations of the input models
REFERENCE_RESULTS = "results/references/{model}/eval/results.json"
REFERENCE_SAMPLES = "results/references/{model}/eval/samples"
REFERENCE_SCORES = "results/references/{model}/scores.json"

# audits
PUBLISHED_DEMO = DEMO_DIR + "/published/{copy}"  # {copy}: pass | altered
AUDIT_REPORT = "results/audits/{audit}/audit.json"
AUDIT_MARKDOWN = "results/audits/{audit}/audit.md"
AUDIT_MODELS = "results/audits/models"  # hub models an audit downloads


def path(pattern: str, **values: str) -> str:
    """A pattern with its wildcards filled in."""
    return pattern.format(**values)


def shard_path(merge: str, point: str, shard_file: str) -> str:
    """A shard's path from its file name (`model-00001-of-00002.safetensors`)."""
    return path(SHARD, merge=merge, point=point, shard=shard_file.removesuffix(".safetensors"))


def digests_path(merge: str, point: str, shard_file: str) -> str:
    return path(DIGESTS, merge=merge, point=point, shard=shard_file.removesuffix(".safetensors"))
