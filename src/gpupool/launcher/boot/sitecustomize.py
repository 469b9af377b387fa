"""gpupool's bootstrap for `gpupool run`: runs in every Python process the command starts.

`gpupool run` puts this directory first on PYTHONPATH, so Python imports this module at start-up
(site.py). It chains to any other `sitecustomize` later on sys.path, then arranges for the
gpupool client to be installed the moment the program imports torch — before any of its code
runs with torch — so "cuda" lands on the pooled GPU. Processes that never import torch pay
nothing but this import.
"""

from __future__ import annotations

import os
import sys


def _boot() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        from gpupool.launcher import bootstrap
    except ImportError:
        # The command's Python has no gpupool installed: use the copy this file belongs to.
        sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(here))))
        try:
            from gpupool.launcher import bootstrap
        except ImportError as e:
            print(f"gpupool: cannot load the gpupool client in {sys.executable}: {e}", file=sys.stderr)
            return
    bootstrap.chain_sitecustomize(here, __name__)
    bootstrap.arm()


_boot()
