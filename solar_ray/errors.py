"""The one base class of user-facing errors.

A :class:`UserError` is a mistake in what the user gave (a config field, a model file, a
data row): the CLI prints its message on one line and exits 2, without a traceback. So is
an OS error about the user's files or machine (:func:`user_os_error`: no space, no
permission, a name too long). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class UserError(ValueError):
    """Bad input from the user; the message names the field or file and the fix."""


#: OS errors that are about the user's files or machine, not a bug in solar-ray
USER_OS_ERRORS = frozenset(
    {
        errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
        errno.EFBIG, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR,
        errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV, errno.EMFILE, errno.ENFILE, errno.EIO,
    }
)  # fmt: skip


def user_os_error(e: BaseException) -> str | None:
    """One line naming the path(s) and the reason, when ``e`` is such an OS error; else None."""
    if not isinstance(e, OSError) or e.errno not in USER_OS_ERRORS:
        return None
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    what = e.strerror or type(e).__name__
    return f"{paths}: {what}" if paths else what
