"""Compiled kernels (built on first use) behind the per-tensor entry point."""
