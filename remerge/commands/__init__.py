"""Thin command-line entry points; the logic lives in the modules of `remerge`."""
