# Evaluation with lm-eval, in-process, for every grid point and every reference model.


rule evaluate_model:
    input:
        index=paths.INDEX,
        config=paths.CONFIG,
        shards=shard_files,
    output:
        results=paths.EVAL_RESULTS,
        scores=paths.SCORES,
    log:
        "logs/{merge}/{point}/evaluate_model.log",
    benchmark:
        "benchmarks/{merge}/{point}/evaluate_model.tsv"
    conda:
        "../envs/remerge.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=eval_runtime,
        gpu=eval_gpus,
    params:
        model_dir=lambda wc: paths.path(paths.MODEL_DIR, merge=wc.merge, point=wc.point),
        settings=eval_settings,
        offline=lambda wc: eval_offline(),
        samples=lambda wc: (
            paths.path(paths.EVAL_SAMPLES, merge=wc.merge, point=wc.point)
            if EVAL["log_samples"]
            else None
        ),
    script:
        "../scripts/evaluate_model.py"


rule evaluate_reference:
    input:
        manifest=lambda wc: manifest(wc.model),
    output:
        results=paths.REFERENCE_RESULTS,
        scores=paths.REFERENCE_SCORES,
    log:
        "logs/references/{model}/evaluate_reference.log",
    benchmark:
        "benchmarks/references/{model}/evaluate_reference.tsv"
    conda:
        "../envs/remerge.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=eval_runtime,
        gpu=eval_gpus,
    params:
        model_dir=None,
        settings=eval_settings,
        offline=lambda wc: eval_offline(),
        samples=lambda wc: (
            paths.path(paths.REFERENCE_SAMPLES, model=wc.model)
            if EVAL["log_samples"]
            else None
        ),
    script:
        "../scripts/evaluate_model.py"
