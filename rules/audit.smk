# Audits of published merges: recover the recipe, re-merge in memory, compare bit by bit.
# `demo:pass` / `demo:altered` are the demo's seed merge "published" with an author's card
# (and, for altered, one flipped bit and a changed generation_config.json).


rule publish_demo:
    input:
        index=paths.path(paths.INDEX, merge="seed", point=wf.SINGLE_POINT),
        config=paths.path(paths.CONFIG, merge="seed", point=wf.SINGLE_POINT),
        shards=lambda wc: shard_paths("seed", "single"),
    output:
        passing=directory(paths.path(paths.PUBLISHED_DEMO, copy="pass")),
        altered=directory(paths.path(paths.PUBLISHED_DEMO, copy="altered")),
    log:
        "logs/demo/publish_demo.log",
    conda:
        "../envs/remerge.yaml"
    resources:
        mem_mb=500,
        runtime=10,
    params:
        model_dir=lambda wc, input: os.path.dirname(input.index),
        recipe=seed_recipe_text,
        author_paths=lambda wc: {
            wf.model_reference(m, MODELS[m]): f"{wf.DEMO_AUTHOR_DIR}/{m}"
            for m in MERGES["seed"].models()
        },
    script:
        "../scripts/publish_demo.py"


rule audit_model:
    input:
        published=audit_published_input,
        manifests=audit_manifests,
    output:
        report=paths.AUDIT_REPORT,
        markdown=paths.AUDIT_MARKDOWN,
    log:
        "logs/audits/{audit}/audit_model.log",
    conda:
        "../envs/remerge.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        published=audit_published,
        recipe=lambda wc: AUDITS[wc.audit]["recipe"],
        path_map=audit_path_map,
        transplant_from=audit_transplant,
        version=lambda wc: AUDITS[wc.audit]["mergekit_version"],
        models_dir=paths.AUDIT_MODELS,
    script:
        "../scripts/audit_model.py"
