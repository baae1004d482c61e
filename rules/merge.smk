# The merge, shard by shard: plan (checkpoint) -> merge_shard per output shard -> assemble.


checkpoint plan_merge:
    input:
        manifests=merge_manifest_files,
    output:
        plan=paths.PLAN,
    log:
        "logs/{merge}/plan_merge.log",
    conda:
        "../envs/remerge.yaml"
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        recipe=plan_recipe_text,
        manifests=merge_manifests,
        version=lambda wc: MERGES[wc.merge].mergekit_version,
        out_shard_size=lambda wc: MERGES[wc.merge].out_shard_size,
    script:
        "../scripts/plan_merge.py"


rule merge_shard:
    input:
        plan=paths.PLAN,
        manifests=merge_manifest_files,
    output:
        shard=paths.SHARD,
        digests=paths.DIGESTS,
    log:
        "logs/{merge}/{point}/merge_shard/{shard}.log",
    benchmark:
        "benchmarks/{merge}/{point}/merge_shard/{shard}.tsv"
    conda:
        "../envs/remerge.yaml"
    threads: 4
    resources:
        mem_mb=lambda wc, input, attempt: merge_mem_mb(input.plan, wc, attempt),
        runtime=60,
    params:
        recipe=recipe_text,
        manifests=merge_manifests,
        version=lambda wc: MERGES[wc.merge].mergekit_version,
        seed=lambda wc: MERGES[wc.merge].random_seed,
    script:
        "../scripts/merge_shard.py"


rule assemble_model:
    input:
        plan=paths.PLAN,
        shards=shard_files,
        digests=shard_digests,
    output:
        index=paths.INDEX,
        recipe=paths.RECIPE,
        tensors=paths.TENSORS,
    log:
        "logs/{merge}/{point}/assemble_model.log",
    conda:
        "../envs/remerge.yaml"
    resources:
        mem_mb=500,
        runtime=10,
    params:
        recipe=recipe_text,
    script:
        "../scripts/assemble_model.py"
