"""One error family for everything a user can fix.

Every message says what went wrong, for which item (file, tensor, model, config key), and how
to fix it. The command line prints the message alone (no traceback) and exits non-zero.
"""

from __future__ import annotations


class RemergeError(Exception):
    """A failure caused by the input, with a message that names the item and the fix."""


class RecipeError(RemergeError, ValueError):
    """A merge recipe that we cannot run exactly (bad key, bad value, unsupported feature)."""


class ModelError(RemergeError):
    """A model folder or weight file that cannot be read as the recipe needs."""


class DownloadError(RemergeError):
    """A model that could not be fetched or verified."""


class EvaluationError(RemergeError):
    """An evaluation that cannot run (missing data, unknown task, model that does not load)."""


class AuditError(RemergeError):
    """A published model whose recipe or files cannot be audited."""
