"""Built-in passes: every module in this package registers its passes on import.

Discovery is automatic so that adding a technique is adding one file (plus its test).
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
