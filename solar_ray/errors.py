"""The one base class of user-facing errors.

A :class:`UserError` is a mistake in what the user gave (a config field, a model file, a
data row): the CLI prints its message on one line and exits 2, without a traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message names the field or file and the fix."""
