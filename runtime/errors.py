"""User-facing errors.

A ``UserError`` is a problem with the user's input (model, data, options, a
missing tool).  The CLI prints it as one line, ``error: <message>``, and exits
with status 2 and no traceback; anything else is a lowbit bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    exit_code = 2
