"""Running set-up code when a module gets imported (Python has no post-import hook of its own)."""

from __future__ import annotations

import importlib.abc
import sys

__all__ = ["when_imported"]


class _CallAfterExec(importlib.abc.Loader):
    """A module's own loader, followed by callbacks once the module has run; every other attribute
    (get_source, get_filename, resources) is the original loader's."""

    def __init__(self, loader, callbacks):
        self._loader, self._callbacks = loader, callbacks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for callback in self._callbacks:
            callback()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module with callbacks it asks the finders after it for the spec and
    wraps that spec's loader, so the callbacks run right after the module's first import."""

    def __init__(self):
        self.callbacks: dict[str, list] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.callbacks:
            return None
        callbacks = self.callbacks.pop(fullname)
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _CallAfterExec(spec.loader, callbacks)
                return spec
        return None


_after_import = _AfterImportFinder()


def when_imported(module_name: str, callback) -> None:
    """Run ``callback()`` once ``module_name`` is imported: now if it already is, else right after its
    import. Keeps ``import moe_ops`` from importing Inductor (and so dynamo) or transformers itself, which
    together cost seconds; they are set up when the user's program imports them (torch.compile does)."""
    if module_name in sys.modules:
        callback()
        return
    if _after_import not in sys.meta_path:
        sys.meta_path.insert(0, _after_import)
    callbacks = _after_import.callbacks.setdefault(module_name, [])
    if callback not in callbacks:
        callbacks.append(callback)
