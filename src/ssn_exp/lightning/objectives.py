"""Training objectives (layer 2): what a training step of :class:`ssn_exp.lightning.module.SmoothedTraining`
minimises, one class each, built from the ``objective._target_`` of ``conf/training/*.yaml``.

An objective receives the model, the noise, a batch and the step's generator, draws its noisy samples itself
(so how many samples it takes, and in which order, is its own business: the generator is seeded per step, see
:mod:`ssn_exp.lightning.module`) and returns ``(loss, logits, logs)``: the scalar loss to minimise, the logits of
the first noisy sample of each example (``train/acc_noisy`` is measured on them) and extra scalars logged as
``train/<key>``. A new objective is one class here (or in the user's own module) and one YAML file::

    # conf/training/my_objective.yaml
    name: my_objective
    epochs: 30
    objective:
      _target_: mypkg.MyObjective
      some_weight: 1.0
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from ssn_exp.exceptions import UserError
from ssn_exp.noises import Noise

__all__ = ["Objective", "ObjectiveError", "Standard", "Stability", "stability_loss", "checked_step"]


class ObjectiveError(UserError, TypeError):
    """An objective that does not keep the interface (one-line message)."""


def stability_loss(logits: torch.Tensor, logits2: torch.Tensor, y: torch.Tensor, weight: float):
    """Stability training: CE(f(x1), y) + weight * KL(softmax f(x1) || softmax f(x2)); returns (loss, kl).

    KL(P || Q) with P = softmax f(x1) (the sample the cross-entropy sees) and Q = softmax f(x2), averaged
    over the batch: ``F.kl_div(log Q, log P, log_target=True)``.
    """
    kl = F.kl_div(F.log_softmax(logits2, 1), F.log_softmax(logits, 1), reduction="batchmean", log_target=True)
    return F.cross_entropy(logits, y) + weight * kl, kl


class Objective:
    """The interface of a training objective (subclass it; ``loss`` is the only method)."""

    def loss(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        noise: Noise,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, logits of the first noisy sample per example, extra scalars logged as ``train/<key>``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Standard(Objective):
    """Cross-entropy on one noisy sample per example (fresh noise per example)."""

    def loss(self, model, noise, x, y, generator):
        logits = model(noise.sample(x, generator))
        return F.cross_entropy(logits, y), logits, {}


class Stability(Objective):
    """Stability training (Li et al. 2019, the paper's appendix B): :func:`stability_loss` on two independent noisy
    samples of each example, drawn in one call on ``[x, x]``; logs the KL term as ``train/kl``."""

    def __init__(self, weight: float = 6.0):
        import math

        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ObjectiveError(f"the stability weight must be a finite number, got {weight!r}")
        self.weight = float(weight)

    def loss(self, model, noise, x, y, generator):
        logits, logits2 = model(noise.sample(torch.cat([x, x]), generator)).chunk(2)
        loss, kl = stability_loss(logits, logits2, y, self.weight)
        return loss, logits, {"kl": kl}


def checked_step(objective: Objective, out, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``out`` (what ``objective.loss`` returned) if it keeps the interface, else an :class:`ObjectiveError` naming
    the objective: a user's objective that returns the wrong thing fails in one line at its first step."""
    name = type(objective).__name__
    if not isinstance(out, tuple) or len(out) != 3:
        raise ObjectiveError(
            f"the training objective {name}.loss must return (loss, logits, logs), got {type(out).__name__}"
        )
    loss, logits, logs = out
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise ObjectiveError(f"the training objective {name}.loss must return a scalar floating-point loss first")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != batch_size:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ObjectiveError(
            f"the training objective {name}.loss must return the (batch size {batch_size}, classes) logits second, "
            f"got {got}"
        )
    if not isinstance(logs, dict) or not all(isinstance(k, str) and k for k in logs):
        raise ObjectiveError(f"the training objective {name}.loss must return a dict of named scalars third")
    return loss, logits, logs
