"""Denoiser variants (appendix D; Salman et al. 2020), one class each, built from the ``_target_`` of
``conf/denoiser/*.yaml`` (layer 2).

A variant decides what a run does around its base classifier: which stages (:mod:`ssn_exp.lightning.denoiser_stages`) it
trains or loads into the run's model F o D, whether the run then trains that model or only certifies it, and
writing the run checkpoint when it does not train. The entry point builds the variant and calls
:meth:`Denoiser.prepare`; it never asks which variant it is.

- :class:`NoDenoiser` (``none``): the run trains its classifier under the noise;
- :class:`StabilityDenoiser` (``stability``): F from the clean-classifier stage, frozen; D trained with
  CE(F(D(x_tilde)), argmax F(x)); the run certifies F o D;
- :class:`MSEDenoiser` (``mse``): F from the clean-classifier stage; D trained with ||D(x_tilde) - x||^2; certifies;
- :class:`MSERetrain` (``mse_retrain``): D from the MSE stage, a fresh F trained through it with D fine-tuned
  jointly (the run's own training).
"""

from __future__ import annotations

import io
import logging
import math
import numbers
import re
from pathlib import Path

import torch

from ssn_exp.exceptions import UserError

log = logging.getLogger("ssn_exp")

__all__ = [
    "Denoiser",
    "DenoiserError",
    "NoDenoiser",
    "StagedDenoiser",
    "StabilityDenoiser",
    "MSEDenoiser",
    "MSERetrain",
]

_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")


class DenoiserError(UserError, ValueError):
    """A denoiser setting or stage that cannot be used (one-line message)."""


def _plain(node):
    """A plain dict / list copy of a config node (a nested config arrives unresolved-free as a DictConfig)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    return node


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise DenoiserError(f"{key} must be an integer >= 1, got {value!r}")
    return int(value)


class Denoiser:
    """A denoiser variant; this base is the run without a denoiser (``denoiser=none``): nothing is loaded, the run
    trains its classifier. Subclasses override :meth:`prepare` (and :attr:`trains`)."""

    #: whether the run trains its module after :meth:`prepare` (else it only certifies what prepare loaded)
    trains = True

    def __init__(self, name: str = "none"):
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise DenoiserError(f"denoiser.name must be a short name (letters, digits, _ . + -), got {name!r}")
        self.name = name
        #: the denoiser network's ``_target_`` config (None: the model is the classifier alone)
        self.net: dict | None = None

    def prepare(self, module, datamodule, *, ckpt_dir: Path, resume_from: str | None, make_trainer, trust):
        """The module the run goes on with: ``module`` (the run's :class:`ssn_exp.lightning.module.SmoothedTraining`,
        freshly built) with whatever the variant loads into it. ``resume_from``: the run's own checkpoint when the run
        resumes (then nothing is trained again); ``make_trainer(**kwargs)`` builds a Lightning Trainer from the run's
        trainer config (for stages); ``trust``: what stage checkpoints may build (:class:`ssn_exp.trust.Trust`)."""
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class NoDenoiser(Denoiser):
    """No denoiser: the smoothed classifier is the base classifier itself.

    The stage settings of the other variants are accepted and unused, so that settings given for whichever variant
    is chosen (``debug=fast`` sets ``denoiser.epochs``, ``denoiser.stage_root``, ...) compose with this one too."""

    def __init__(
        self,
        name: str = "none",
        stage_root=None,
        epochs=None,
        lr=None,
        classifier_epochs=None,
        classifier_ckpt=None,
        denoiser_ckpt=None,
    ):
        super().__init__(name)


class StagedDenoiser(Denoiser):
    """A denoiser D trained once as a stage in ``stage_root`` and reused by every run with the same settings (with the
    clean classifier F of the data set where the variant uses it). Not trained further by the run: the run checkpoint
    is F o D as loaded, written atomically, and the run certifies it."""

    trains = False
    #: the stage kind that trains D (:data:`ssn_exp.lightning.denoiser_stages.KINDS`)
    stage_kind = "denoiser_mse"
    #: F comes from the clean-classifier stage (else the run's own, freshly initialised F)
    clean_classifier = True

    def __init__(
        self,
        name: str,
        net,
        stage_root: str = "outputs/stages",
        epochs: int = 30,
        lr: float = 1.0e-3,
        classifier_epochs: int = 30,
        classifier_ckpt: str | None = None,
        denoiser_ckpt: str | None = None,
    ):
        super().__init__(name)
        net = _plain(net)
        if not isinstance(net, dict) or not isinstance(net.get("_target_"), str):
            raise DenoiserError(f"denoiser.net must be a _target_ config (the denoiser network), got {net!r}")
        self.net = net
        if not isinstance(stage_root, (str, Path)) or not str(stage_root):
            raise DenoiserError(f"denoiser.stage_root must be a folder, got {stage_root!r}")
        self.stage_root = Path(stage_root)
        self.epochs = _positive_int(epochs, "denoiser.epochs")
        self.classifier_epochs = _positive_int(classifier_epochs, "denoiser.classifier_epochs")
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
            raise DenoiserError(f"denoiser.lr must be a positive number, got {lr!r}")
        self.lr = float(lr)
        for key, value in (("classifier_ckpt", classifier_ckpt), ("denoiser_ckpt", denoiser_ckpt)):
            if value is not None and not isinstance(value, (str, Path)):
                raise DenoiserError(f"denoiser.{key} must be a checkpoint path or null, got {value!r}")
        self.classifier_ckpt = classifier_ckpt or None
        self.denoiser_ckpt = denoiser_ckpt or None

    def prepare(self, module, datamodule, *, ckpt_dir: Path, resume_from: str | None, make_trainer, trust):
        from ssn_exp.lightning.module import load_checkpoint

        if resume_from is not None:  # F o D was loaded before: the run checkpoint holds it
            return module if self.trains else load_checkpoint(resume_from, expect=module.identity(), trust=trust)
        self._load_stages(module, datamodule, make_trainer, trust)
        if not self.trains:
            save_run_checkpoint(Path(ckpt_dir) / "last.ckpt", module)
        return module

    # -- the stages --------------------------------------------------------------------------------------------------
    def _stage_init(self, clean_ckpt, trust) -> dict | None:
        """State-dict entries loaded into the D stage before it trains (none: D starts fresh)."""
        return None

    def _load_stages(self, module, dm, make_trainer, trust) -> None:
        """Load (training and caching them first if needed) the stages of this variant into the module's F o D."""
        from ssn_exp.lightning.denoiser_stages import ensure_stage, load_stage
        from ssn_exp.lightning.module import semantic_data

        hp, sm = module.hparams, module.smoothing
        base = {"model": hp["model"], "data": semantic_data(hp["data"])}
        seed = hp["seed"]
        model_name = str(hp["model"].get("_target_", "model")).rsplit(".", 1)[-1]
        clean_ckpt = None
        if self.clean_classifier:
            clean_ckpt = self.classifier_ckpt or ensure_stage(
                self.stage_root,
                "clean",
                f"{dm.name}-{model_name}-seed{seed}",
                {**base, "optimizer": hp["optimizer"]},
                dm,
                self.classifier_epochs,
                make_trainer,
                seed=seed,
            )
        den_ckpt = self.denoiser_ckpt
        if not den_ckpt:
            den_ckpt = ensure_stage(
                self.stage_root,
                self.stage_kind,
                f"{dm.name}-{sm.name}-sigma{sm.sigma:g}-seed{seed}",
                {**base, "method": hp["method"], "denoiser_net": hp["denoiser"]["net"], "denoiser_lr": self.lr},
                dm,
                self.epochs,
                make_trainer,
                init=self._stage_init(clean_ckpt, trust),
                seed=seed,
            )
        den = load_stage(den_ckpt, trust)
        if den.hparams.kind == "clean" or den.smoothing.name != sm.name or den.smoothing.sigma != sm.sigma:
            raise DenoiserError(f"denoiser checkpoint {den_ckpt} is not a denoiser for {sm.name} sigma={sm.sigma:g}")
        module.model.denoiser.load_state_dict(den.denoiser.state_dict())
        if clean_ckpt is not None:
            clean = load_stage(clean_ckpt, trust)
            if clean.hparams.kind != "clean":
                raise DenoiserError(f"{clean_ckpt} is not a clean-classifier stage checkpoint")
            module.model.classifier.load_state_dict(clean.classifier.state_dict())
        log.info("denoiser %s: D from %s%s", self.name, den_ckpt, f", F from {clean_ckpt}" if clean_ckpt else "")


class StabilityDenoiser(StagedDenoiser):
    """Stability denoising: F pre-trained on clean images is frozen; D is trained with CE(F(D(x_tilde)), argmax F(x))
    (its stage starts from that F); the run certifies F o D."""

    stage_kind = "denoiser_stability"

    def _stage_init(self, clean_ckpt, trust) -> dict | None:
        from ssn_exp.lightning.denoiser_stages import load_stage

        clean = load_stage(clean_ckpt, trust).classifier.state_dict()
        return {**{f"classifier.{k}": v for k, v in clean.items()}, "_source": str(clean_ckpt)}


class MSEDenoiser(StagedDenoiser):
    """MSE denoising: D is trained with ||D(x_tilde) - x||^2; the run certifies F o D with the clean classifier F."""


class MSERetrain(MSEDenoiser):
    """MSE denoising with retraining: D from the MSE stage, a fresh classifier trained on noisy samples through D
    with D fine-tuned jointly (the run's ``training`` settings); certify F o D."""

    trains = True
    clean_classifier = False


def save_run_checkpoint(path: Path, module) -> None:
    """The run checkpoint of a module that is not trained (F o D as loaded): its hyper-parameters and weights, in the
    layout :func:`ssn_exp.lightning.module.load_checkpoint` reads, written atomically and never through a link."""
    from ssn_exp.lightning.results import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(), "epoch": 0}, buffer)
    write_text_atomic(path, buffer.getvalue())
