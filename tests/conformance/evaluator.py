"""Evaluate a structured alias on logits, through kdsl.numerics (float32) or the float64 reference.

This is the mathematics an alias stands for, written without the kdsl
compiler: per position, the weighted sum of its atoms; then the masked sum
over valid positions divided by the alias's denominator.
"""

from __future__ import annotations

import numpy as np
import torch

import tests.reference64 as ref
from kdsl import numerics
from tests.conformance.aliases import Alias, Atom, Mixture, Model


class _Side:
    """Log-probabilities of `o` and `q` at any temperature, computed once each."""

    def __init__(self, backend: str, student_logits, teacher_logits):
        self.backend = backend
        self.logits = {"q": student_logits, "o": teacher_logits}
        self.cache: dict = {}

    def dist(self, dist):
        if isinstance(dist, Mixture):
            weights = [w for w, _ in dist.parts]
            parts = [self.dist(model) for _, model in dist.parts]
            if self.backend == "numerics":
                return numerics.log_mixture(parts, weights)
            return ref.mixture(list(zip(weights, parts)))
        key = (dist.name, dist.temperature)
        if key not in self.cache:
            logits = self.logits[dist.name]
            if logits is None:
                raise ValueError(f"the alias reads {dist.name!r} but no logits were given for it")
            module = numerics if self.backend == "numerics" else ref
            self.cache[key] = module.log_softmax(logits, temperature=dist.temperature)
        return self.cache[key]


def _atom(side: _Side, atom: Atom, labels):
    module = numerics if side.backend == "numerics" else ref
    args = [side.dist(arg) for arg in atom.args]
    if atom.kind == "CE":
        return module.token_nll(side.dist(Model("q")), labels)
    if atom.kind == "KL":
        return module.kl(*args)
    if atom.kind == "JS":
        return module.js(*args, atom.param)
    if atom.kind == "SKL":
        return module.skew_kl(*args, atom.param)
    if atom.kind == "SRKL":
        return module.skew_reverse_kl(*args, atom.param)
    if atom.kind == "TV":
        return module.total_variation(*args)
    if atom.kind == "H":
        return module.entropy(*args) if len(args) == 1 else module.cross_entropy(*args)
    if atom.kind == "ULD":
        teacher, student = args
        return module.uld(student, teacher)
    raise KeyError(f"unknown atom kind {atom.kind!r}")


def per_position(alias: Alias, student_logits, teacher_logits, labels, backend: str = "numerics"):
    """Return Σ_terms coefficient·atom at every position, valid or not."""
    side = _Side(backend, student_logits, teacher_logits)
    total = None
    for coefficient, atom in alias.terms:
        value = _atom(side, atom, labels)
        if coefficient != 1.0:
            value = coefficient * value
        total = value if total is None else total + value
    return total


def reduce(alias: Alias, values, labels, vocab: int, position_weight=None):
    """Return the masked sum of per-position values divided by the alias's denominator."""
    valid = labels != -100
    count = int(valid.sum())
    num_items = alias.num_items(labels, vocab)
    denominator = max(count, 1) if num_items is None else num_items
    if isinstance(values, torch.Tensor):
        if position_weight is not None:
            values = values * position_weight
        return torch.where(valid, values, 0.0).sum() / denominator
    valid = np.asarray(valid.cpu())
    if position_weight is not None:
        values = values * np.asarray(position_weight.cpu(), dtype=np.float64)
    return float(np.where(valid, values, 0.0).sum() / denominator)


def loss(alias: Alias, student_logits, teacher_logits, labels, backend: str = "numerics", position_weight=None):
    """Evaluate the alias on one batch: per-position values, then the reduction."""
    values = per_position(alias, student_logits, teacher_logits, labels, backend)
    vocab = student_logits.shape[-1]
    return reduce(alias, values, labels, vocab, position_weight)
