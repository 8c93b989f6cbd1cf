"""The one exception type for a user's mistake (a wrong flag, a missing file, unreadable data).

The ``dynconv`` command prints a :class:`UserError` as one line, ``dynconv: error: MESSAGE``, and exits
with status 2 (argparse's convention); any other exception is a bug and keeps its traceback. ``--debug``
shows the traceback of a user error too. The message names the file or flag and says what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: the message names the file or flag, what was found and what is expected."""
