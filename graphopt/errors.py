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


class Notice(UserWarning):
    """Something done on the user's behalf that they should know of (e.g. data cast to the
    model's dtype); the CLI prints it as one line on stderr, `pwgroup: note: ...`."""


class InternalError(GraphoptError):
    """A check of pwgroup's own work failed: a bug in pwgroup, not in the model (CLI: exit 1,
    nothing written)."""


def runtime_reason(exc: BaseException, limit: int = 300) -> str:
    """A runtime's error as one line: its last line of its own words, without the traceback
    TensorFlow puts in a graph execution error ("File ..." lines) or the node it names
    ("[[{{node ...}}]] [Op:...]"). A long line keeps its end, where onnxruntime says what
    went wrong after the source line of the check that failed."""
    lines = [line.strip() for line in str(exc).splitlines()]
    if lines and lines[0].startswith("[ONNXRuntimeError]"):  # code : kind : what, over lines
        lines[0] = lines[0].split(" : ")[-1]
        words = [line for line in lines if line and not line.startswith("Please fix")]
        lines = [" ".join(words)]
    own = [
        line
        for line in lines
        if line and not line.startswith(("File ", "[[")) and not line.endswith(":")
    ]
    reason = own[-1] if own else " ".join(" ".join(lines).split()) or type(exc).__name__
    return reason if len(reason) <= limit else "..." + reason[3 - limit :]
