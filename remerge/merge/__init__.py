"""The merge core: recipes, mergekit releases, methods, the shard plan, one entry point per output tensor, the streaming loop, kernels."""
