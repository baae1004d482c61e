# The model card (README.md) and provenance.json of every merged model.


rule write_model_card:
    input:
        tensors=paths.TENSORS,
        configs=paths.CONFIGS,
        recipe=paths.RECIPE,
        manifests=merge_manifest_files,
        stages=lambda wc: list(stage_provenances(wc).values()),
        scores=lambda wc: (
            paths.path(paths.SCORES, merge=wc.merge, point=wc.point)
            if MERGES[wc.merge].evaluate
            else []
        ),
    output:
        card=paths.CARD,
        provenance=paths.PROVENANCE,
    log:
        "logs/{merge}/{point}/write_model_card.log",
    conda:
        "../envs/remerge.yaml"
    resources:
        mem_mb=500,
        runtime=10,
    params:
        name=lambda wc: card_name(wc),
        manifests=merge_manifests,
        names=lambda wc: {
            wf.model_reference(m, INPUTS[m]): m for m in MERGES[wc.merge].models()
        },
        licenses=lambda wc: {
            wf.model_reference(m, INPUTS[m]): INPUTS[m].get("license")
            for m in MERGES[wc.merge].models()
        },
        stages=stage_provenances,
        version=lambda wc: MERGES[wc.merge].mergekit_version,
        point=point_values,
    script:
        "../scripts/write_model_card.py"
