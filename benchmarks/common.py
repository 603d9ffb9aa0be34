"""What the benchmark scripts share. They run as scripts (python benchmarks/x.py), so this folder is on sys.path."""

from __future__ import annotations

import os
import sys


def import_lora_fx():
    """import lora_fx, also from a plain checkout that was never pip-installed (the device machine): the package
    maps lora_fx.passes to the top-level passes/ folder (pyproject's package-dir), so register it by hand."""
    try:
        import lora_fx
        import lora_fx.passes  # noqa: F401
        return lora_fx
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lora_fx"):
            raise
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for k in [k for k in sys.modules if k == "lora_fx" or k.startswith("lora_fx.")]:
        del sys.modules[k]
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("lora_fx.passes", os.path.join(root, "passes", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(root, "passes")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lora_fx.passes"] = mod
    spec.loader.exec_module(mod)
    import lora_fx
    lora_fx.passes = mod
    return lora_fx
