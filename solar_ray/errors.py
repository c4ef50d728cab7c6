"""The one base class of user-facing errors.

A :class:`UserError` is a mistake in what the user gave (a config field, a model file, a
data row): the CLI prints its message on one line and exits 2, without a traceback. So is
an OS error about the user's files or machine (:func:`user_os_error`: no space, no
permission, a name too long). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import importlib
from types import ModuleType


class UserError(ValueError):
    """Bad input from the user; the message names the field or file and the fix."""


class MissingDependencyError(UserError):
    """A package that a chosen feature needs is not installed; the message says how to get it."""


def require(module: str, feature: str, *, extra: str | None = None, package: str | None = None) -> ModuleType:
    """Import an optional ``module`` that ``feature`` (a config field and value) needs.

    When it is missing, one line names the feature, the package and the ``solar-ray`` extra
    that installs it (``pip install 'solar-ray[wandb]'``), or the package itself.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = package or module.split(".")[0]
        broken = f" (importing it failed: {e})" if e.name not in (None, module, package) else ""
        how = f"pip install 'solar-ray[{extra}]'" if extra else f"pip install {package}"
        raise MissingDependencyError(
            f"{feature} needs the package {package}, which is not installed{broken}: {how}"
        ) from None


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
