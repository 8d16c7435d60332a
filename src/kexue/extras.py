"""Optional dependencies: one place that imports them and names the extra that provides them.

``pip install kexue`` gives the core (torch, numpy, the ``kexue`` command). Each capability that
needs more lists it in an extra of ``pyproject.toml``; importing such a dependency goes through
:func:`require`, which turns a missing package into a one-line
:class:`~kexue.exceptions.MissingExtraError` (an ``ImportError``) naming the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kexue.exceptions import MissingExtraError

__all__ = ["install_hint", "is_available", "require"]


def install_hint(extra: str) -> str:
    """The command that installs ``extra``: ``pip install 'kexue[extra]'``."""
    return f"pip install 'kexue[{extra}]'"


def require(module: str, extra: str, what: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``extra``.

    ``what`` says who needs it (default: ``kexue.<extra>``), e.g.
    ``require("transformers", "lst")`` raises
    ``kexue.lst needs transformers, which is not installed: pip install 'kexue[lst]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        if err.name is not None and err.name.split(".")[0] != top:
            raise  # the package is there but one of *its* imports failed: show that
        who = what or f"kexue.{extra}"
        raise MissingExtraError(
            f"{who} needs {top}, which is not installed: {install_hint(extra)}"
        ) from None


def is_available(module: str) -> bool:
    """True when ``module`` can be imported."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
