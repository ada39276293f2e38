"""Router collapse detection: one expert taking most of an MoE layer's routes for many steps in a row.

The trainer feeds `CollapseMonitor.update` every optimizer step with the routes each expert of each
MoE layer received in that step (summed over the data-parallel ranks). When the busiest expert of a
layer has held more than `share` of that layer's routes for `steps` consecutive steps, `update`
returns one warning line for the layer; the layer stays quiet until its streak breaks, then it can
warn again.

A share is of routes, as the trainer's `moe/blockN/expert_load`: with top-k routing a token sends
its k routes to k distinct experts, so one expert can take at most 1/k of the routes (0.5 at
top-2). Layers that routed nothing in a step (EvoMoE's dense phase) break their streak.

Legend: L MoE layers, E experts.
"""
from __future__ import annotations

from typing import List, Sequence

import torch


class CollapseMonitor:
    """Counts, per MoE layer, consecutive steps in which one expert took more than `share` of the routes.

    Args:
        share: the share of a layer's routes (0 < share <= 1) above which a step counts.
        steps: how many consecutive counting steps make a collapse (>= 1).
        blocks: the model's block index of each MoE layer, in the order of `update`'s rows (for messages).
    """

    def __init__(self, *, share: float, steps: int, blocks: Sequence[int]) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"collapse share must be in (0, 1], got {share}")
        if steps < 1:
            raise ValueError(f"collapse steps must be >= 1, got {steps}")
        self.share, self.steps, self.blocks = share, steps, list(blocks)
        self.streak = [0] * len(self.blocks)  # consecutive steps above `share`, per layer
        self._warned = [False] * len(self.blocks)

    def update(self, step: int, loads_LE: torch.Tensor) -> List[str]:
        """Account one step. Returns the warning lines of the layers whose streak reached `steps` now.

        Args:
            step: the optimizer step just taken (1-based, for the message).
            loads_LE: [L, E] routes per expert in this step, summed over the data-parallel ranks.
        """
        if loads_LE.shape[0] != len(self.blocks):
            raise ValueError(f"loads for {loads_LE.shape[0]} MoE layers, monitor built for {len(self.blocks)}")
        total_L = loads_LE.sum(-1)
        top_share_L, top_E = (loads_LE / total_L.clamp_min(1).unsqueeze(-1)).max(-1)
        out = []
        for j, b in enumerate(self.blocks):
            if float(total_L[j]) > 0 and float(top_share_L[j]) > self.share:
                self.streak[j] += 1
            else:
                self.streak[j], self._warned[j] = 0, False
            if self.streak[j] >= self.steps and not self._warned[j]:
                self._warned[j] = True
                out.append(f"warning: router collapse in block {b}: expert {int(top_E[j])} took "
                           f"{float(top_share_L[j]):.2f} of the routes at step {step}, over "
                           f"{self.share:g} for {self.streak[j]} steps in a row "
                           f"(trainer.collapse_share={self.share:g}, trainer.collapse_steps={self.steps})")
        return out
