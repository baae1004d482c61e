"""`python -m remerge.merge.methods`: print the methods table of config/README.md."""

from remerge.merge.methods import methods_markdown

print(methods_markdown(), end="")
