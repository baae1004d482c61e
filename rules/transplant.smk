# Config and tokenizer files: mergekit's (config.json from the base with torch_dtype set, the
# base's tokenizer), then, with `transplant_from`, every .json but the index from that model.


rule transplant_configs:
    input:
        index=paths.INDEX,
        manifests=merge_manifest_files,
        donor=lambda wc: (
            [manifest(transplant_donor(wc))] if transplant_donor(wc) else []
        ),
    output:
        config=paths.CONFIG,
        record=paths.CONFIGS,
    log:
        "logs/{merge}/{point}/transplant_configs.log",
    conda:
        "../envs/remerge.yaml"
    resources:
        mem_mb=500,
        runtime=10,
    params:
        recipe=recipe_text,
        manifests=merge_manifests,
        donor=lambda wc: (
            wf.model_reference(transplant_donor(wc), MODELS[transplant_donor(wc)])
            if transplant_donor(wc)
            else None
        ),
        version=lambda wc: MERGES[wc.merge].mergekit_version,
    script:
        "../scripts/transplant_configs.py"
