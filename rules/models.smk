# Inputs: every model gets results/models/<model>/manifest.json (files, sizes, sha256; for hub
# models also the requested revision and the resolved commit).


rule build_demo_models:
    output:
        base=directory("results/demo/base"),
        instruct=directory("results/demo/instruct"),
    params:
        out_dir="results/demo",
        seed=config["demo"]["seed"],
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    log:
        "logs/demo/build_demo_models.log",
    benchmark:
        "benchmarks/demo/build_demo_models.tsv"
    conda:
        "../envs/remerge.yaml"
    script:
        "../scripts/build_demo_models.py"


rule record_model:
    input:
        local_folder,
    output:
        manifest="results/models/{model}/manifest.json",
    wildcard_constraints:
        model="|".join(local_models()) or "^$",
    resources:
        mem_mb=500,
        runtime=30,
    log:
        "logs/models/{model}/record_model.log",
    conda:
        "../envs/remerge.yaml"
    script:
        "../scripts/record_model.py"


rule download_model:
    output:
        manifest="results/models/{model}/manifest.json",
    wildcard_constraints:
        model="|".join(hub_models()) or "^$",
    params:
        repo=lambda wc: MODELS[wc.model]["repo"],
        revision=lambda wc: MODELS[wc.model].get("revision", "main"),
        out_dir=lambda wc: f"results/models/{wc.model}",
    threads: 2
    resources:
        mem_mb=2000,
        runtime=240,
        network=1,
    retries: 2
    log:
        "logs/models/{model}/download_model.log",
    conda:
        "../envs/remerge.yaml"
    script:
        "../scripts/download_model.py"
