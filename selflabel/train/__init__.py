"""Trainers: SeLa (`sela.train_sela`) and SwAV (`swav.train_swav`), both `(features, k, cfg, ...) -> LabelResult`.

Pieces apart, lightly-style: `heads.py` (networks), `losses.py` (pure losses), `queue.py` (SwAV queue),
`augment.py` (feature and image views), `checkpoint.py` (atomic per-epoch state), `common.py` (plumbing).
"""
