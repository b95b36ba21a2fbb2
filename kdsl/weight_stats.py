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
does (`rho/mean/ρ(T, w)·KL(o‖q)`).

The weights are recomputed from the logits the loss received, with the
sequence pre-pass of `kdsl.lower`, so they are the values the loss used. This
costs one extra pass without gradient over the log-probabilities that the
weights read (the student's and the reference model's, for DIMP).

NOTE: this module builds `kdsl.lower`'s private `_Call`, `_Plan` and `_Rows`
as `CompiledObjective.forward` does, so a change to those classes must be
made here too. tests/test_weight_stats.py compares the logged values with a
float64 computation from the models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdsl import scalars
from kdsl.ir import Node
from kdsl.lower import _ROLE_SYMBOLS, CompiledObjective, _Call, _ModelInput, _Plan, _Rows

__all__ = ["SequenceWeightStats"]


class SequenceWeightStats:
    """Running sums of each sequence-weighted term's weights over one optimizer step."""

    def __init__(self, module: CompiledObjective, terms: list[Node]):
        self.module = module
        self.terms = terms
        single = len(terms) == 1
        self.suffixes = {term.name: "" if single else "/" + module.term_keys[term.name] for term in terms}
        # Per term: [responses with a scored token, sum of applied weights, responses clipped], in float64.
        self.sums = {term.name: torch.zeros(3, dtype=torch.float64) for term in terms}

    @classmethod
    def for_module(cls, module: Any) -> "SequenceWeightStats | None":
        """Return the statistics of `module`'s sequence weights, or None when no term has one.

        Only `CompiledObjective` is supported. NOTE: objectives with projections
        (`kdsl.projected.ProjectedObjective`) get no statistics.
        """
        if not isinstance(module, CompiledObjective):
            return None
        terms = [term for term in module.graph.term_nodes() if term.named_input("seq_weight") is not None]
        return cls(module, terms) if terms else None

    def observe(self, labels: Tensor, *, group: int, epoch: float, step: int, progress: float,
                student_logits: Tensor | None = None, teacher_logits: Tensor | None = None,
                ref_logits: Tensor | None = None) -> None:
        """Add the weights of one batch of `group`, from the inputs its loss received (logits aligned with labels)."""
        terms = [term for term in self.terms if term.group == group]
        if not terms:
            return
        models = {
            "student": _ModelInput("student", student_logits),
            "teacher": _ModelInput("teacher", teacher_logits),
            "ref": _ModelInput("ref", ref_logits),
        }
        rows = _Rows(labels.long())
        call = _Call(
            module=self.module, plan=_Plan(self.module.graph, terms), models=models, rows=rows,
            schedule={"epoch": float(epoch), "step": float(step), "progress": float(progress)},
            vocab=self.module._shared_vocab(models),
        )
        with torch.no_grad():
            call.sequence_pass()
            scored = rows.lengths > 0
            for term in terms:
                node = self.module.graph.node(term.named_input("seq_weight"))
                applied = call.sequence_values[node.name].double()[scored]
                clip = node.attr("clip")
                clipped = 0
                if clip is not None:
                    clipped = int((unclipped_weight(call, node)[scored] > clip).sum())
                self.sums[term.name] += torch.tensor([float(applied.numel()), float(applied.sum()), float(clipped)],
                                                     dtype=torch.float64)

    def collect(self, accelerator: Any = None) -> dict[str, float]:
        """Return this step's `rho/...` metrics, summed over processes, and reset the sums.

        With more than one process every process must call this, because the sums are all-reduced.
        """
        names = [term.name for term in self.terms]
        totals = torch.stack([self.sums[name] for name in names])
        if accelerator is not None and accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        metrics: dict[str, float] = {}
        for term, (count, weight_sum, clipped) in zip(self.terms, totals.tolist()):
            if count == 0:
                continue
            suffix = self.suffixes[term.name]
            metrics[f"rho/mean{suffix}"] = weight_sum / count
            node = self.module.graph.node(term.named_input("seq_weight"))
            if node.attr("clip") is not None:
                metrics[f"rho/clipped{suffix}"] = clipped / count
        for name in names:
            self.sums[name].zero_()
        return metrics


def unclipped_weight(call: _Call, node: Node) -> Tensor:
    """Evaluate a sequence weight [B] in float64 before `rho.clip`, from the call's sequence log-probabilities."""
    bindings = call.schedule_bindings()
    bindings.update({_ROLE_SYMBOLS[key]: call.sequence_values[name] for key, name in node.named})
    weight = scalars.evaluate(node.attr("expr"), bindings, dtype=torch.float64)
    return weight.expand(call.rows.batch) if weight.dim() == 0 else weight
