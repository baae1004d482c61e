"""Files on disk: safetensors weights read lazily and shards written atomically, file names, atomic writes."""
