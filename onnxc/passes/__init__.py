"""Built-in passes: every public module in this package registers its passes on import.

Discovery is automatic so that adding a technique is adding one file (plus its test). Modules are
imported on demand: `-p prune` loads `prune.py` alone, `onnxc passes` loads them all.
"""

import importlib
import pkgutil


def load_all() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
