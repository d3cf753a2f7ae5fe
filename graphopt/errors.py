"""The one error hierarchy of graphopt: every failure a user can act on is a GraphoptError."""

from __future__ import annotations


class GraphoptError(Exception):
    """Base of every error graphopt raises on purpose; the CLI prints it as one line (exit 2)."""


class InputError(GraphoptError):
    """The model given cannot be read: missing, corrupt, empty or of an unknown kind."""


class UnsafeModelError(GraphoptError):
    """The model would need unsafe deserialisation (code execution) to load."""


class UnsupportedModelError(GraphoptError):
    """The model can be read but not rewritten (e.g. a subclassed Keras model)."""


class OutputError(GraphoptError):
    """The output cannot be written where asked (e.g. it is the input file)."""


class UsageError(GraphoptError):
    """An option has a value that makes no sense."""


class InternalError(GraphoptError):
    """A check of pwgroup's own work failed: a bug in pwgroup, not in the model (CLI: exit 1,
    nothing written)."""
