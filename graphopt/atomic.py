"""Writing a file so that a reader, or a kill at any instant, sees the old file or the new one,
never half of one: every output of pwgroup (models, reports, checkpoint records) goes through
`replacing`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def replacing(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary path beside `path` (ending in `suffix`, for writers that go by the
    extension) to write into; when the block ends without an error it is flushed to disk, given
    an ordinary file's permissions and renamed over `path` in one step, else removed."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
