"""remerge: reproduce, sweep and audit published LLM weight merges.

The package holds the logic (recipes, the streaming merge engine, downloads, scores, cards,
audits); the Snakemake workflow around it only wires files together. Nothing in here imports
Snakemake.
"""

__version__ = "0.1.0"
