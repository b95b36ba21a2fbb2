"""Per-step statistics of the sequence weights ρ(w) that a compiled objective applies.

A sequence weight such as the DIMP ratio (ref(w)/q(w))^(1/T) multiplies the
loss of each sampled response, and `rho.clip` caps it. When most weights sit
at the cap, the weighting acts as a constant and the importance correction
is lost. `SequenceWeightStats` makes that visible in the training metrics:

- `rho/mean`: the mean weight the loss applied (after clipping) over the
  responses of the optimizer step that have at least one scored token;
- `rho/clipped`: the share of those responses whose weight exceeded
  `rho.clip` before clipping (logged only when `rho.clip` is set).

With several weighted terms the keys end in the term's name, as `loss/...`
does (`rho/mean/ρ(T, w)·KL(o‖q)`). The weights come from
`LossResult.sequence_weights`, so they are the values the loss used and cost
no extra pass.
"""

from __future__ import annotations

from typing import Any

import torch

from kdsl.lower import CompiledObjective, LossResult

__all__ = ["SequenceWeightStats"]


class SequenceWeightStats:
    """Running sums of each sequence-weighted term's weights over one optimizer step."""

    def __init__(self, clips: dict[str, float | None]):
        self.clips = clips  # term name -> rho.clip of its weight, or None
        single = len(clips) == 1
        self.suffixes = {key: "" if single else "/" + key for key in clips}
        # Per term: [responses with a scored token, sum of applied weights, responses clipped], in float64.
        self.sums = {key: torch.zeros(3, dtype=torch.float64) for key in clips}

    @classmethod
    def for_module(cls, module: Any) -> "SequenceWeightStats | None":
        """Return the statistics of `module`'s sequence weights, or None when no term has one.

        `module` is a `CompiledObjective` or a `kdsl.projected.ProjectedObjective`;
        for any other module there is nothing to observe.
        """
        from kdsl.projected import ProjectedObjective

        if not isinstance(module, (CompiledObjective, ProjectedObjective)):
            return None
        clips = {}
        for term in module.graph.term_nodes():
            name = term.named_input("seq_weight")
            if name is not None:
                clips[module.term_keys[term.name]] = module.graph.node(name).attr("clip")
        return cls(clips) if clips else None

    def observe(self, result: LossResult) -> None:
        """Add the weights that one call of the compiled objective applied."""
        for key, weights in result.sequence_weights.items():
            applied = weights.applied[weights.scored]
            clipped = 0
            if weights.clip is not None:
                clipped = int((weights.unclipped[weights.scored] > weights.clip).sum())
            self.sums[key] += torch.tensor([float(applied.numel()), float(applied.sum()), float(clipped)],
                                           dtype=torch.float64)

    def collect(self, accelerator: Any = None) -> dict[str, float]:
        """Return this step's `rho/...` metrics, summed over processes, and reset the sums.

        With more than one process every process must call this, because the sums are all-reduced.
        """
        keys = list(self.clips)
        totals = torch.stack([self.sums[key] for key in keys])
        if accelerator is not None and accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        metrics: dict[str, float] = {}
        for key, (count, weight_sum, clipped) in zip(keys, totals.tolist()):
            if count == 0:
                continue
            metrics[f"rho/mean{self.suffixes[key]}"] = weight_sum / count
            if self.clips[key] is not None:
                metrics[f"rho/clipped{self.suffixes[key]}"] = clipped / count
        for key in keys:
            self.sums[key].zero_()
        return metrics
