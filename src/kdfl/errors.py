"""The user-facing error type, in a module that imports nothing heavy.

The command line catches :class:`KdflError` before it imports torch (``kdfl --version``
and ``kdfl --help`` never do); :mod:`kdfl.types` re-exports it, so both names are the
same class.
"""

from __future__ import annotations


class KdflError(Exception):
    """A user-facing error: the message names the problem and the fix."""
