"""A run's record of how K was chosen: ``k_selection.png``, the candidate curve (modularity of each
cut of the cluster tree, the chosen K marked), written atomically next to the manifest's table."""
from __future__ import annotations

import io
from pathlib import Path

from .atomic import atomic_write_bytes
from .kselect import KSelection

K_SELECTION_PNG = "k_selection.png"


def save_k_selection_plot(run_dir: str | Path, sel: KSelection) -> Path | None:
    """Write ``run_dir/k_selection.png``; None (nothing written) when there was no curve (K = 1 data)."""
    if not sel.candidates:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    ks = [c["k"] for c in sel.candidates]
    qs = [c["modularity"] for c in sel.candidates]
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=120)
    ax.plot(ks, qs, marker="o", ms=3, lw=1.2)
    ax.axvline(sel.k, color="tab:red", ls="--", lw=1)
    ax.annotate(f"K = {sel.k}", (sel.k, max(qs)), xytext=(6, -12), textcoords="offset points", color="tab:red")
    ax.set_xlabel("K (cut of the cluster tree)")
    ax.set_ylabel("modularity on the image kNN graph")
    ax.set_title(f"choosing K: {sel.n_small} small clusters, {sel.n_used} images", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(run_dir) / K_SELECTION_PNG
    atomic_write_bytes(path, buf.getvalue())
    return path
