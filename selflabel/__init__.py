"""selflabel: label an unannotated image collection (SeLa, SwAV, Leopart), review and export.

    import selflabel
    run = selflabel.label("photos/", out="runs/photos", k=20)     # the `selflabel label` options
    run.labels                                                      # pandas, review edits applied
    new = run.assign("more_photos/")                               # the reviewed clusters, for new images
    selflabel.SinkhornKMeans(n_clusters=10).fit(X).predict(X_new)  # scikit-learn estimator

The public names load on first use (PEP 562), so `selflabel --help` and the CLI's start do not pay
for torch; `import selflabel.api` etc. import them directly.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {"label": "api", "run_config": "api", "Run": "run", "SinkhornKMeans": "estimators"}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'selflabel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
