# Audits of published merges: recover the recipe, re-merge, compare tensor by tensor.
