"""Model references, hub downloads at pinned revisions, and per-model manifests."""
