"""The pool controller: inventory, scheduler and queue, signed leases, users and tokens, the REST API.

    from gpupool.controller import Settings, create_app
    app = create_app(Settings(db_url="sqlite:///pool.db"))

See docs/controller.md for the API, the scheduling rules and the lease format. The package is
imported lazily: `gpupool.controller.leases` (lease verification, on GPU servers) and
`gpupool.controller.client` (the CLI's side) do not pull in FastAPI or SQLAlchemy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpupool.controller.app import Settings, create_app

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gpupool.controller import app

        return getattr(app, name)
    raise AttributeError(name)
