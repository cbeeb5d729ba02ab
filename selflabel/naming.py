"""Names (bottom layer): default cluster and concept names, and safe names for exported folders and
categories (user-given cluster names are untrusted)."""
from __future__ import annotations

import re
import unicodedata

_BAD = re.compile(r"[^\w\-. ]+", flags=re.UNICODE)


def default_name(cluster: int) -> str:
    """A cluster's name until a user gives it one (review app, CSV, ImageFolder and COCO alike)."""
    return f"cluster_{int(cluster):02d}"


def concept_name(concept_id: int) -> str:
    """A dense concept's name until a user renames it: concept_01, concept_02, ..."""
    return f"concept_{int(concept_id):02d}"


def sanitize_name(name: str, fallback: str) -> str:
    """A single safe path component: no separators, no '..', no control chars, <= 80 chars."""
    s = unicodedata.normalize("NFC", str(name)).strip()
    s = re.sub(r"\.{2,}", "_", _BAD.sub("_", s))
    s = re.sub(r"_+", "_", s).strip(" ._")[:80]
    if not s or s in {".", ".."}:
        return fallback
    return s


def flatten_path(rel: str) -> str:
    """'a/b/c.jpg' -> 'a__b__c.jpg': unique file names inside one class folder."""
    parts = [sanitize_name(p, "_") for p in rel.split("/") if p not in ("", ".", "..")]
    return "__".join(parts) or "image"
