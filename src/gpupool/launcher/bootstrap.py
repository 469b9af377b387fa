"""What `gpupool run`'s sitecustomize does in the command's Python processes.

Note [Install on import]: importing torch costs seconds, so the bootstrap does not import it;
it puts a finder first on `sys.meta_path` that notices `import torch` and installs the client
(`gpupool.client.redirect.enable`) right after torch's own module has run, i.e. before the
program's next line. The same finder patches optional torch modules (`torch.distributed`,
`torch.utils.cpp_extension`) when, and if, they are imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

_state = threading.local()


def chain_sitecustomize(boot_dir: str, our_name: str) -> None:
    """Run the next `sitecustomize` on sys.path (the one ours shadows), if there is one."""
    paths = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != boot_dir]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", paths)
    if spec is None or spec.loader is None or spec.origin == os.path.join(boot_dir, "sitecustomize.py"):
        return
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - as site.py does: report and carry on
        print(f"gpupool: error in the chained sitecustomize ({spec.origin}): {e!r}", file=sys.stderr)


def _on_torch() -> None:
    from gpupool.client import redirect

    redirect.enable()


def _hooks() -> dict[str, Callable[[ModuleType], None]]:
    def torch_hook(_mod: ModuleType) -> None:
        _on_torch()

    def lazy(name: str) -> Callable[[ModuleType], None]:
        def hook(mod: ModuleType) -> None:
            # Note: torch imports torch.distributed while it is itself being imported; then the
            # client is not enabled yet, and `enable()` patches the module once torch is ready.
            redirect = sys.modules.get("gpupool.client.redirect")
            if redirect is None or not redirect.is_enabled():
                return
            from gpupool.client import cuda_shim

            cuda_shim.post_import_hooks()[name](mod)

        return hook

    return {
        "torch": torch_hook,
        "torch.distributed": lazy("torch.distributed"),
        "torch.utils.cpp_extension": lazy("torch.utils.cpp_extension"),
    }


class PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs a hook right after one of a few named modules has been imported."""

    def __init__(self, hooks: dict[str, Callable[[ModuleType], None]]) -> None:
        self.hooks = hooks

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        hook = self.hooks.get(fullname)
        if hook is None or getattr(_state, "busy", False):
            return None
        _state.busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            _state.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_hook(module: ModuleType) -> None:
            exec_module(module)
            if fullname == "torch":
                # Note: only once torch is fully imported; its submodules import each other.
                self.hooks.pop("torch", None)
            hook(module)

        loader.exec_module = exec_then_hook  # type: ignore[method-assign]
        return spec


def arm() -> None:
    """Install the client now if torch is already imported, else when it is."""
    if not os.environ.get("GPUPOOL_SERVER"):
        return
    hooks = _hooks()
    for name in list(hooks):
        if name in sys.modules:
            if name != "torch" and "torch" not in sys.modules:
                continue
            hooks.pop(name)(sys.modules[name])
    if hooks:
        sys.meta_path.insert(0, PostImportFinder(hooks))
