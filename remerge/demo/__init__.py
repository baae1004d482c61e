"""The embedded offline demo: tiny base and instruct models, and a 'published' seed merge."""
