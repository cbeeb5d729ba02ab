"""Curation signals from the features: near-duplicate groups, per-image outlier scores, and review
suggestions (merges, misplaced images, splits). Pure functions on arrays (`duplicates`, `outliers`,
`suggestions`), and `run.curate_run`, the post-step that writes them into a run folder."""
from .duplicates import DUPLICATE_THRESHOLD, duplicate_of, duplicate_paths, without_duplicates
from .outliers import outlier_scores
from .suggestions import Suggestion, suggest

__all__ = ["DUPLICATE_THRESHOLD", "duplicate_of", "duplicate_paths", "without_duplicates", "outlier_scores",
           "Suggestion", "suggest"]
