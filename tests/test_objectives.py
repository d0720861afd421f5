"""Training objectives are classes built from ``training.objective._target_`` (issue 17 item 5): one defined here,
outside the package, trains through a YAML file on the search path; the stability objective is CE + w * KL as
before; checkpoints of the layout before (``training`` a name, ``stability_weight`` a number, a denoiser config
without ``_target_``) load, resume and mean what they meant. In-process (no entry-point subprocess)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from helpers import SAMPLED_NOISES, all_noises
from helpers import compose_config as _compose
from ssn_exp.cli.config import ConfigError
from ssn_exp.lightning.checkpoint import checked_hparams
from ssn_exp.lightning.module import SmoothedTraining, load_checkpoint
from ssn_exp.lightning.objectives import Objective, ObjectiveError, Stability, Standard, stability_loss
from ssn_exp.models import CheckpointError, read_checkpoint
from ssn_exp.noises import Uniform
from test_trust import HPARAMS, save_checkpoint


class Halved(Objective):
    """A user's objective (not in the package): half the cross-entropy of one noisy sample, and a counter."""

    calls = 0

    def __init__(self, factor: float = 0.5):
        self.factor = factor

    def loss(self, model, noise, x, y, generator):
        Halved.calls += 1
        logits = model(noise.sample(x, generator))
        ce = F.cross_entropy(logits, y)
        return self.factor * ce, logits, {"ce": ce}


class NotAStep(Objective):
    def loss(self, model, noise, x, y, generator):
        return model(noise.sample(x, generator)).sum()  # a bare tensor, not (loss, logits, logs)


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 17, (n, 1, 8, 8), generator=g).float() / 16, torch.randint(0, 10, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))


# ----------------------------------------------------------------------------- an objective from outside the package


@pytest.mark.slow  # a real fit and certification in-process: 5-8 s on a shared 2-core CPU
def test_an_objective_defined_outside_the_package_trains_certifies_and_its_checkpoint_reloads(tmp_path):
    from ssn_exp.cli.train import run_train
    from ssn_exp.trust import Trust

    conf = tmp_path / "conf" / "training"
    conf.mkdir(parents=True)
    (conf / "halved.yaml").write_text(
        "name: halved\nepochs: 1\nobjective:\n  _target_: test_objectives.Halved\n  factor: 0.25\n"
    )
    out = tmp_path / "run"
    cfg = _compose(
        [
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            "training=halved",
            "debug=fast",
            "method=uniform",
            "logger=none",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=0",
            "certify.max_examples=2",
            "procedure.n=64",
        ],
        out,
    )
    Halved.calls = 0
    metrics = run_train(cfg)
    assert Halved.calls == 2  # one epoch of two batches, every one through the objective
    assert metrics["training"] == "halved" and metrics["n_examples"] == 2
    last = out / "checkpoints" / "last.ckpt"
    hp = checked_hparams(read_checkpoint(last), last, Trust.from_config(cfg))
    assert hp["training"] == {"name": "halved", "objective": {"_target_": "test_objectives.Halved", "factor": 0.25}}
    # a checkpoint is data: the user's objective is built from it only when the user trusts it
    with pytest.raises(CheckpointError, match=r"hyper_parameters\.training\.objective\._target_") as err:
        load_checkpoint(last)
    assert "\n" not in str(err.value)
    module = load_checkpoint(last, trust=Trust.from_config(cfg))
    assert isinstance(module.objective, Halved) and module.objective.factor == 0.25
    assert module.identity()["training"] == "halved"


def test_the_objectives_loss_is_what_a_training_step_minimises_and_its_logs_are_logged():
    kw = dict(model=HPARAMS["model"], method=HPARAMS["method"], data=HPARAMS["data"], seed=3)
    module = SmoothedTraining(**kw, training={"name": "h", "objective": {"_target_": "test_objectives.Halved"}})
    logged = {}
    module.log = lambda key, value, **_: logged.__setitem__(key, value)  # what Lightning would log
    x, y = _batch()
    loss = module.training_step((x, y), 0)
    logits = module(module.smoothing.sample(x, module._generator(1, 0, 0)))  # the step's noise: stream 1, epoch 0
    torch.testing.assert_close(loss, 0.5 * F.cross_entropy(logits, y))
    assert set(logged) == {"train/ce", "train/loss", "train/acc_noisy"}
    torch.testing.assert_close(logged["train/ce"], F.cross_entropy(logits, y))


def test_an_objective_that_breaks_the_interface_is_one_line():
    kw = dict(model=HPARAMS["model"], method=HPARAMS["method"], data=HPARAMS["data"])
    module = SmoothedTraining(**kw, training={"name": "x", "objective": {"_target_": "test_objectives.NotAStep"}})
    with pytest.raises(ObjectiveError, match=r"NotAStep\.loss must return \(loss, logits, logs\), got Tensor"):
        module.training_step(_batch(), 0)
    with pytest.raises(TypeError, match="builds Uniform, not a training objective"):
        SmoothedTraining(**kw, training={"name": "x", "objective": {"_target_": "ssn_exp.noises.Uniform", "sigma": 1}})
    with pytest.raises(ObjectiveError, match="finite number"):
        Stability(weight=math.nan)


def test_a_training_config_without_an_objective_is_a_one_line_migration_error(tmp_path):
    from ssn_exp.cli.train import build_parts

    conf = tmp_path / "conf" / "training"
    conf.mkdir(parents=True)
    (conf / "old.yaml").write_text("name: old\nepochs: 1\n")  # a user's training file written for the old layout
    cfg = _compose([f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "training=old"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"old\.yaml has no objective: add `objective: \{_target_: ssn_exp"):
        build_parts(cfg)
    cfg = _compose(["training.objective._target_=ssn_exp.noises.SSN", "+training.objective.sigma=1"], tmp_path / "r")
    with pytest.raises(ConfigError, match=r"standard\.yaml builds SSN as its objective, not a training objective"):
        build_parts(cfg)


# ----------------------------------------------------------------------------- the two objectives of the paper


@pytest.mark.parametrize("name", SAMPLED_NOISES)
def test_stability_is_ce_plus_weight_times_kl_on_two_samples_drawn_together(name):
    noise = all_noises()[name]
    x, y = _batch()
    model = _model()
    loss, logits, logs = Stability(weight=6.0).loss(model, noise, x, y, torch.Generator().manual_seed(5))
    # as before the objectives were classes: one draw for [x, x], the first half is x1, the second x2
    both = model(noise.sample(torch.cat([x, x]), torch.Generator().manual_seed(5)))
    l1, l2 = both[:6], both[6:]
    p, q = F.softmax(l1, 1), F.softmax(l2, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(logs["kl"], kl)
    torch.testing.assert_close(loss, F.cross_entropy(l1, y) + 6.0 * kl)
    torch.testing.assert_close(logits, l1)
    assert torch.equal(loss, stability_loss(l1, l2, y, 6.0)[0])


def test_standard_is_the_cross_entropy_of_one_noisy_sample():
    x, y = _batch()
    model = _model()
    loss, logits, logs = Standard().loss(model, Uniform(0.5), x, y, torch.Generator().manual_seed(1))
    want = model(Uniform(0.5).sample(x, torch.Generator().manual_seed(1)))
    assert torch.equal(logits, want) and torch.equal(loss, F.cross_entropy(want, y)) and logs == {}


def test_the_stability_weight_key_still_sets_the_weight(tmp_path):
    from ssn_exp.cli.train import build_parts

    cfg = _compose(["training=stability", "training.stability_weight=3.5", "method=ssn"], tmp_path / "run")
    *_, hparams = build_parts(cfg)
    assert hparams["training"] == {
        "name": "stability",
        "objective": {"_target_": "ssn_exp.lightning.objectives.Stability", "weight": 3.5},
    }
    assert SmoothedTraining(**hparams).objective.weight == 3.5


# ----------------------------------------------------------------------------- checkpoints of the layout before


def _old_layout(training="stability", weight=3.0, denoiser=None):
    hp = copy.deepcopy(HPARAMS)  # test_trust's: written as checkpoints were before issue 17
    hp.update(training=training, stability_weight=weight, denoiser=denoiser or {"name": "none"})
    return hp


def test_an_old_layout_checkpoint_loads_as_what_it_meant(tmp_path):
    torch.manual_seed(0)
    weights = SmoothedTraining(**HPARAMS).state_dict()
    module = load_checkpoint(save_checkpoint(tmp_path / "old.ckpt", _old_layout(), weights))
    assert isinstance(module.objective, Stability) and module.objective.weight == 3.0
    assert module.identity()["training"] == "stability" and module.identity()["denoiser"] == "none"
    standard = load_checkpoint(save_checkpoint(tmp_path / "std.ckpt", _old_layout("standard", 6.0), weights))
    assert type(standard.objective) is Standard
    hp = checked_hparams(read_checkpoint(tmp_path / "old.ckpt"), tmp_path / "old.ckpt")
    assert "stability_weight" not in hp and hp["denoiser"]["_target_"] == "ssn_exp.lightning.denoisers.NoDenoiser"
    # a denoiser run of the old layout: its variant is the one of that name, its weights F o D load
    net = {"_target_": "ssn_exp.models.DnCNN", "in_channels": 1, "depth": 3, "width": 4}
    den = {"name": "mse", "stage_root": "outputs/stages", "epochs": 30, "lr": 1e-3, "classifier_epochs": 30,
           "classifier_ckpt": None, "denoiser_ckpt": None, "net": net}  # fmt: skip
    old = _old_layout("standard", 6.0, den)
    torch.manual_seed(0)
    sd = SmoothedTraining(**old).state_dict()
    module = load_checkpoint(save_checkpoint(tmp_path / "den.ckpt", old, sd))
    assert module.identity()["denoiser"] == "mse" and module.hparams.denoiser["net"] == net
    assert module.hparams.denoiser["_target_"] == "ssn_exp.lightning.denoisers.MSEDenoiser"
    # what was refused before still is, in one line naming the key
    for bad, words in [
        (_old_layout("fancy"), "hyper_parameters.training is 'fancy'"),
        (_old_layout(weight=float("inf")), "hyper_parameters.stability_weight is inf"),
        ({**_old_layout(), "training": {"name": "stability", "objective": {"_target_": "ssn_exp.lightning.objectives.Stability"}}},
         "does not know (stability_weight)"),
        (_old_layout(denoiser={"name": "magic"}), "hyper_parameters.denoiser is {'name': 'magic'}"),
        (_old_layout(denoiser={"name": ["mse"]}), "hyper_parameters.denoiser is {'name': ['mse']}"),
        (_old_layout(denoiser={"name": "../x", "_target_": "ssn_exp.lightning.denoisers.NoDenoiser"}),
         "hyper_parameters.denoiser is"),
    ]:  # fmt: skip
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(save_checkpoint(tmp_path / "bad.ckpt", bad, weights))
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("training,denoiser", [("stability", "none"), ("standard", "mse")])
def test_a_run_folder_of_the_old_layout_resumes_with_todays_config(tmp_path, training, denoiser):
    """The run's hyper-parameters built from today's config equal an old checkpoint's read in today's layout, so the
    same command resumes a run started before the change instead of refusing 'different settings'."""
    from ssn_exp.cli.config import container
    from ssn_exp.cli.train import _resume_point, build_parts

    overrides = [f"training={training}", f"denoiser={denoiser}", "method=ssn", "debug=fast"]
    if denoiser != "none":
        overrides += ["denoiser.net.depth=3", "denoiser.net.width=4"]
    cfg = _compose(overrides, tmp_path / "run")
    *_, hparams = build_parts(cfg)
    old = copy.deepcopy(hparams)  # what the entry point stored before: a name, a weight, a denoiser without target
    old["training"] = training
    old["stability_weight"] = float(cfg.training.get("stability_weight", 6.0))
    old["denoiser"] = {k: v for k, v in container(cfg.denoiser).items() if k != "_target_"}
    torch.manual_seed(0)
    module = SmoothedTraining(**hparams)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_checkpoint(run / "checkpoints" / "last.ckpt", old, module.state_dict())
    assert _resume_point(cfg, run, hparams, module.identity()) == str(run / "checkpoints" / "last.ckpt")
    changed = copy.deepcopy(hparams)
    changed["training"]["objective"]["_target_"] = (
        "ssn_exp.lightning.objectives.Standard" if training != "standard" else "ssn_exp.lightning.objectives.Stability"
    )
    with pytest.raises(ConfigError, match=r"different settings \(training\.objective\._target_"):
        _resume_point(cfg, run, changed, module.identity())


# ----------------------------------------------------------------------------- today's layout, edited at random

_NEW = {
    **{k: v for k, v in HPARAMS.items() if k != "stability_weight"},
    "training": {
        "name": "stability",
        "objective": {"_target_": "ssn_exp.lightning.objectives.Stability", "weight": 6.0},
    },
    "denoiser": {"_target_": "ssn_exp.lightning.denoisers.NoDenoiser", "name": "none", "epochs": 1},
}


def test_an_edited_checkpoint_of_either_layout_loads_or_is_one_line(tmp_path):
    """The training and denoiser entries of today's layout and of the one before, edited at random (junk values,
    deleted keys, names of the old layout): the checkpoint loads with an objective, or is refused in one line."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from test_checkpoint_fuzz import _apply, _paths, junk

    torch.manual_seed(0)
    weights = SmoothedTraining(**_NEW).state_dict()
    keys = ("training", "denoiser", "stability_weight")
    paths = sorted({p for hp in (_NEW, HPARAMS) for p in _paths(hp) if p[0] in keys} | {("stability_weight",)})
    value = st.one_of(junk, st.sampled_from(["standard", "stability", "none", "mse", "DELETE"]))

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(base=st.sampled_from([_NEW, HPARAMS]), edits=st.lists(st.tuples(st.sampled_from(paths), value), max_size=3))
    def check(base, edits):
        hp = copy.deepcopy(base)
        for path, v in edits:
            if path == ("stability_weight",) and v != "DELETE":
                hp["stability_weight"] = v
            else:
                _apply(hp, path, v)
        try:
            module = load_checkpoint(save_checkpoint(tmp_path / "edited.ckpt", hp, weights))
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(exc).strip(), repr(str(exc))
        else:
            assert isinstance(module.objective, Objective) and isinstance(module.identity()["training"], str)

    check()
