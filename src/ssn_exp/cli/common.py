"""What both entry points share (layer 3): building the noise and the certificate procedure from the config,
checking a user's network, the trust of configs read from files, and certifying a model without training.

Entry points (``cli/train.py``, ``cli/certify.py``) import from here, never from each other.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from ssn_exp.cli.config import ConfigError, build, config_source

log = logging.getLogger("ssn_exp")

__all__ = [
    "finish_wandb",
    "build_loggers",
    "user_callbacks",
    "check_network",
    "run_trust",
    "build_noise",
    "build_procedure",
    "refuse_other_certificates",
    "certify_model",
]


def finish_wandb():
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def build_loggers(cfg: DictConfig) -> list:
    """The loggers of the ``logger`` group: its named entries (``logger=[csv,wandb]`` composes both; ``logger=none``
    none; ``logger.NAME=null`` drops one), or one logger where the node has a ``_target_`` of its own."""
    from pytorch_lightning.loggers import Logger

    node = cfg.get("logger")
    nodes = [] if node is None else [("logger", node)] if "_target_" in node else list(node.items())
    loggers = []
    for name, entry in nodes:
        if entry is None:
            continue
        built = build(entry, "logger")
        if not isinstance(built, Logger):
            raise ConfigError(f"{name} from {config_source('logger')} builds {type(built).__name__}, not a Lightning "
                              "logger (pytorch_lightning.loggers.Logger)")  # fmt: skip
        loggers.append(built)
    return loggers


def user_callbacks(cfg: DictConfig, out_dir: Path) -> list:
    """The user's own Lightning callbacks, the named entries of the composed config's ``callbacks`` group (never of a
    checkpoint: a resume restores no callback state, :class:`ssn_exp.lightning.callbacks.RunCheckpoint`). A
    ``ModelCheckpoint`` without a ``dirpath`` saves into ``<run dir>/checkpoints_<name>``; none may use the run's own
    ``checkpoints/`` (resume and certification read it)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    own = (Path(out_dir) / "checkpoints").resolve()
    callbacks = []
    for name, entry in (cfg.get("callbacks") or {}).items():
        if entry is None:
            continue
        cb = build(entry, "callbacks")
        if not isinstance(cb, pl.Callback):
            raise ConfigError(f"callbacks.{name} from {config_source('callbacks')} builds {type(cb).__name__}, not a "
                              "Lightning callback (pytorch_lightning.Callback)")  # fmt: skip
        if isinstance(cb, ModelCheckpoint):
            if cb.dirpath is None:
                cb.dirpath = str(Path(out_dir) / f"checkpoints_{name}")
            if Path(cb.dirpath).resolve() == own:
                raise ConfigError(f"callbacks.{name} saves into the run's own checkpoints/ (what resume reads): give "
                                  "it another dirpath")  # fmt: skip
        callbacks.append(cb)
    return callbacks


def check_network(net, dm, group: str, denoiser: bool = False) -> None:
    """Run ``net`` on two blank images of the data set's shape, then on two random ones, together and one at a time.

    It must return (2, num_classes) finite floating-point logits (the check of every certification's forward passes,
    :func:`~ssn_exp.certify.core.check_logits`; a denoiser: images of the same shape), leave its input as it was (the user's model inside the ``normalized`` wrapper included), and give each example the same
    output whatever else is in the batch (certification batches noisy copies of several examples together).
    Else a :class:`ConfigError` naming the config file.
    """
    import torch

    from ssn_exp.certify.core import check_logits
    from ssn_exp.models import Normalize

    where = f"the {group} from {config_source(group)}"
    shape = (2, *dm.shape)
    inner = net[1] if isinstance(net, torch.nn.Sequential) and len(net) == 2 and isinstance(net[0], Normalize) else None
    changed: list[bool] = []
    seen: dict = {}

    def before(module, args):
        seen["input"] = args[0].clone() if args and isinstance(args[0], torch.Tensor) else None

    def after(module, args, output):
        before_call = seen.pop("input", None)
        if before_call is not None and not torch.equal(before_call, args[0]):
            changed.append(True)

    hooks = [] if inner is None else [inner.register_forward_pre_hook(before), inner.register_forward_hook(after)]

    def run(x):
        try:
            with torch.no_grad():
                return net(x)
        except Exception as exc:  # noqa: BLE001 - any failure of a user's network is a config problem
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise ConfigError(f"{where} does not accept {dm.name} images of shape {list(dm.shape)}: {text}") from None

    was_training = net.training
    net.eval()
    try:
        x = torch.full(shape, 0.5)
        out = run(x)
        if denoiser and not (isinstance(out, torch.Tensor) and out.shape == shape and out.is_floating_point()):
            raise ConfigError(f"{where} does not return floating-point images of the shape of its inputs {list(shape)}")
        finite = torch.isfinite(out).all() if denoiser else check_logits(out, 2, dm.num_classes, who=where).all()
        if not bool(finite):
            raise ConfigError(f"{where} returns NaN or infinite values")
        if changed or not bool((x == 0.5).all()):
            raise ConfigError(
                f"{where} modifies its input in place; it must leave the input tensor as it is "
                "(work on a copy: x = x.clone(), or no in-place operation on x)"
            )
        g = torch.Generator().manual_seed(0)
        x = torch.rand(shape, generator=g)
        x_before = x.clone()
        together, alone = run(x), torch.cat([run(x[:1]), run(x[1:])])
        if changed or not torch.equal(x, x_before):
            raise ConfigError(
                f"{where} modifies its input in place; it must leave the input tensor as it is "
                "(work on a copy: x = x.clone(), or no in-place operation on x)"
            )
        # NaN where the model gives NaN must agree too; certification refuses non-finite logits per example anyway
        scale = float(torch.nan_to_num(together.double(), nan=0.0, posinf=0.0, neginf=0.0).abs().max())
        if together.shape != alone.shape or not torch.allclose(
            together.double(), alone.double(), rtol=1e-3, atol=1e-4 * (1.0 + scale), equal_nan=True
        ):
            raise ConfigError(
                f"{where} gives an example a different output alone than in a batch (or random outputs); "
                "certification needs a deterministic output per example in eval mode (e.g. no batch statistics)"
            )
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)


def run_trust(cfg: DictConfig):
    """What configs read from files may build in this run: ssn_exp's own targets, those of this run's composed
    config (the user's choice; its callbacks excepted) and the modules in ``trust_targets``
    (:class:`ssn_exp.trust.Trust`)."""
    from omegaconf import open_dict

    from ssn_exp.trust import Trust, UntrustedTarget

    if "callbacks" in cfg:  # the user's callbacks run in this process only: a file's config may not build them
        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["callbacks"]
    try:
        return Trust.from_config(cfg)
    except UntrustedTarget as exc:
        raise ConfigError(str(exc)) from None


def build_noise(node: DictConfig, group: str = "method"):
    """The noise of the ``method`` config (any :class:`ssn_exp.noises.Noise`), or a ConfigError naming the file."""
    from ssn_exp.noises import Noise

    noise = build(node, group)
    if not isinstance(noise, Noise):
        raise ConfigError(
            f"{config_source(group)} builds {type(noise).__name__}, not a smoothing noise (ssn_exp.noises.Noise)"
        )
    return noise


def build_procedure(cfg: DictConfig, noise=None):
    """The certificate procedure of the ``procedure`` config, its settings checked (the one check of procedure.n0 / n /
    alpha: the procedure's own), and for ``noise`` if given (``procedure=auto``, the default: the noise's own,
    :class:`ssn_exp.certify.procedures.NoiseDefault`), checked against it: a noise the procedure cannot certify
    (procedure=fixed for dssn, say) is refused in one line before anything is trained or loaded."""
    from ssn_exp.certify.procedures import Procedure, ProcedureError

    if "procedure" not in cfg:
        raise ConfigError("the config has no procedure group: add `- procedure: auto` to its defaults list")
    procedure = build(cfg.procedure, "procedure")
    if not isinstance(procedure, Procedure):
        raise ConfigError(
            f"{config_source('procedure')} builds {type(procedure).__name__}, not a certificate procedure "
            "(ssn_exp.certify.procedures.Procedure)"
        )
    try:
        return procedure if noise is None else procedure.for_noise(noise)
    except ProcedureError as exc:
        raise ConfigError(str(exc)) from None


def refuse_other_certificates(out_dir: Path, weights: str | None, noise, procedure, settings) -> None:
    """Refuse now, before anything is trained, logged or written, a run directory that holds certificates made with
    other settings: the check the certification makes again before it writes its first row
    (:func:`ssn_exp.lightning.certification.check_settings`), so that a refused rerun leaves the run as it was.
    ``settings``: :func:`ssn_exp.cli.config.check_certify_config`'s :class:`CertifyRun`; ``weights``: the fingerprint of the weights to
    certify (:func:`ssn_exp.lightning.results.model_fingerprint`), or None while they are not known (a run that
    trains from scratch: they are compared after training)."""
    from ssn_exp.lightning.certification import certification_settings, check_settings

    recorded = certification_settings(noise, procedure, settings, weights)
    check_settings(out_dir, recorded, weights_known=weights is not None)


def certify_model(cfg: DictConfig, model, noise, procedure, dm, out_dir: Path, settings, meta: dict, logger):
    """Certify ``model`` without training: a Lightning predict loop (sharded over DDP ranks) that runs the one
    certification driver (:func:`ssn_exp.lightning.certification.run_certification`) on every rank. None for a
    job shard (``certify.shard``) that finished before the others."""
    import json

    from ssn_exp.lightning.callbacks import QuietRanks
    from ssn_exp.lightning.certification import CertifyTask

    task = CertifyTask(model, noise, procedure, dm, out_dir, settings, meta)
    trainer = build(
        cfg.trainer,
        "trainer",
        logger=logger if logger else False,
        default_root_dir=str(out_dir),
        use_distributed_sampler=False,
        enable_progress_bar=False,  # the certification reports its own progress, per example
        callbacks=[QuietRanks()],
    )
    trainer.predict(task, return_predictions=False)
    if task.metrics is not None:
        return task.metrics
    if settings.num_shards > 1 and not (Path(out_dir) / "metrics.json").is_file():
        if trainer.world_size > 1:  # (ddp_spawn: rank 0's log line stayed in its process)
            print(f"shard {settings.shard} of {settings.num_shards} done; waiting for the other shards (the last "
                  "to finish merges them)", flush=True)  # fmt: skip
        return None  # a job shard done before the others (it said so): the last one merges
    return json.loads((Path(out_dir) / "metrics.json").read_text())  # ddp_spawn: written by rank 0's process
