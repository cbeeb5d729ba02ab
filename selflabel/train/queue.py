"""SwAV's feature queue: embeddings of the last batches, so small batches still see enough samples
for an (almost) balanced Sinkhorn assignment (main_swav.py, `--queue_length`, `--epoch_queue_starts`)."""
from __future__ import annotations

import torch
from torch import Tensor


class FeatureQueue:
    """FIFO of unit-norm embeddings, one row of slots per view that gives codes."""

    def __init__(self, n_views: int, length: int, dim: int, device: str | torch.device = "cpu") -> None:
        self.z = torch.zeros(n_views, length, dim, device=device)
        self.filled = 0  # number of valid rows (the same for every view)

    @property
    def full(self) -> bool:
        return self.filled >= self.z.shape[1]

    def extend_scores(self, view: int, scores: Tensor, weight: Tensor) -> Tensor:
        """[queue_length + B, K] scores: the queued embeddings scored by the current prototypes, then the batch.

        As in main_swav.py the queue is used only once it is full; before that the batch alone is returned.
        """
        if not self.full:
            return scores
        return torch.cat([self.z[view] @ weight.t(), scores])

    @torch.no_grad()
    def push(self, view: int, z: Tensor, *, last_view: bool = False) -> None:
        """Shift the queue of `view` by B and put the newest embeddings in front (main_swav.py's update)."""
        b = z.shape[0]
        q = self.z[view]
        if b >= q.shape[0]:
            q.copy_(z[: q.shape[0]].detach())
        else:
            q[b:] = q[:-b].clone()
            q[:b] = z.detach()
        if last_view:
            self.filled = min(self.filled + b, q.shape[0])

    def state_dict(self) -> dict:
        return {"z": self.z.detach().cpu(), "filled": int(self.filled)}

    def load_state_dict(self, state: dict) -> None:
        self.z.copy_(state["z"].to(self.z.device))
        self.filled = int(state["filled"])
