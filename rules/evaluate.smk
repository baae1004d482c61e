# Evaluation with lm-eval, in-process, for every grid point and every reference model.


rule evaluate_model:
    input:
        index="results/{merge}/{point}/model/model.safetensors.index.json",
        config="results/{merge}/{point}/model/config.json",
        shards=shard_files,
    output:
        results="results/{merge}/{point}/eval/results.json",
        scores="results/{merge}/{point}/scores.json",
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
        model_dir=lambda wc: f"results/{wc.merge}/{wc.point}/model",
        settings=eval_settings,
        offline=lambda wc: eval_offline(),
        samples=lambda wc: (
            f"results/{wc.merge}/{wc.point}/eval/samples"
            if EVAL["log_samples"]
            else None
        ),
    script:
        "../scripts/evaluate_model.py"


rule evaluate_reference:
    input:
        manifest=lambda wc: manifest(wc.model),
    output:
        results="results/references/{model}/eval/results.json",
        scores="results/references/{model}/scores.json",
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
            f"results/references/{wc.model}/eval/samples"
            if EVAL["log_samples"]
            else None
        ),
    script:
        "../scripts/evaluate_model.py"
