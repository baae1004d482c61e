# Inputs: every model gets results/models/<model>/manifest.json (files, sizes, sha256; for hub
# models also the requested revision and the resolved commit).


rule build_demo_models:
    output:
        base=directory(paths.path(paths.DEMO_MODEL, name="base")),
        instruct=directory(paths.path(paths.DEMO_MODEL, name="instruct")),
    log:
        "logs/demo/build_demo_models.log",
    benchmark:
        "benchmarks/demo/build_demo_models.tsv"
    conda:
        "../envs/remerge.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        out_dir=lambda wc, output: os.path.dirname(output.base),
        seed=config["demo"]["seed"],
    script:
        "../scripts/build_demo_models.py"


rule record_model:
    input:
        folder=local_folder,
        files=local_folder_files,
    output:
        manifest=paths.MANIFEST,
    log:
        "logs/models/{model}/record_model.log",
    wildcard_constraints:
        model="|".join(local_models()) or "^$",
    conda:
        "../envs/remerge.yaml"
    resources:
        mem_mb=500,
        runtime=30,
    script:
        "../scripts/record_model.py"


rule download_model:
    output:
        manifest=paths.MANIFEST,
    log:
        "logs/models/{model}/download_model.log",
    wildcard_constraints:
        model="|".join(hub_models()) or "^$",
    retries: 2
    conda:
        "../envs/remerge.yaml"
    threads: 2
    resources:
        mem_mb=2000,
        runtime=240,
        network=1,
    params:
        repo=lambda wc: MODELS[wc.model]["repo"],
        revision=lambda wc: MODELS[wc.model].get("revision", "main"),
        out_dir=lambda wc: paths.path(paths.MODEL_RECORD, model=wc.model),
    script:
        "../scripts/download_model.py"


# A merge that another merge reads (a chain's earlier stage) is recorded as its readers' input:
# the files of its model folder but README.md (the card, written after, holds its scores).
rule record_stage:
    input:
        config=paths.CONFIG,
        recipe=paths.RECIPE,
        index=paths.INDEX,
        configs=paths.CONFIGS,
    output:
        manifest=paths.STAGE_MANIFEST,
    log:
        "logs/{merge}/{point}/record_stage.log",
    conda:
        "../envs/remerge.yaml"
    resources:
        mem_mb=500,
        runtime=30,
    params:
        folder=lambda wc: paths.path(paths.MODEL_DIR, merge=wc.merge, point=wc.point),
    script:
        "../scripts/record_stage.py"
