"""Register lightning_pp with Lightning when Lightning is imported, not before.

Importing any submodule runs ``lightning_pp/__init__.py`` first, so registering
there eagerly would make every torch-only layer import Lightning (seconds of start-up)
and patch its connectors. Instead, :func:`register_with_lightning` registers at once
if Lightning is already imported, and otherwise leaves a one-shot import hook that
registers right after ``lightning`` finishes importing. A program that never imports
Lightning never pays for it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Optional, Sequence

__all__ = ["register_with_lightning"]


def _register() -> None:
    # lightning_pp.integration registers on import (and its register() is idempotent).
    importlib.import_module("lightning_pp.integration")


class _RegisterAfterLightning(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of ``lightning`` so registration follows its import."""

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]] = None, target: Optional[ModuleType] = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != "lightning":
            return None
        _remove_hook()  # one shot; also keeps the lookup below from finding this hook again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _register()

        # The loader object was made for this spec alone, so wrapping its method is local.
        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterLightning)]


def register_with_lightning() -> None:
    """Registers now if ``lightning`` is imported, else as soon as it is (idempotent)."""
    if "lightning" in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterLightning) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLightning())
