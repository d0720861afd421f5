"""A checkpoint is data (issue 16 §1, §4): nothing read from a checkpoint, a stage checkpoint or a run folder makes
ssn_exp call a function outside the allowed set, and a damaged or edited checkpoint is one ``error:`` line.

Every payload here is first shown to be live (instantiating it directly has its side effect), then planted in a real
checkpoint (a :class:`SmoothedTraining` saved in-process) and refused with no side effect.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import pickle
import sys
import uuid

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import run_cli, run_cli_many
from ssn_exp.lightning.module import SmoothedTraining, load_checkpoint
from ssn_exp.models import CheckpointError
from ssn_exp.trust import Trust, UntrustedTarget, own_targets

HPARAMS = {
    "model": {"_target_": "ssn_exp.models.DigitsCNN", "num_classes": 10, "in_channels": 1, "image_size": 8, "width": 4},
    "method": {
        "_target_": "ssn_exp.noises.DSSN",
        "sigma": 0.5,
        "q": 16,
        "dim": 64,
        "seed": 0,
        "arithmetic": "exact",
    },
    "data": {
        "_target_": "ssn_exp.lightning.data.DigitsData",
        "name": "digits",
        "q": 16,
        "num_classes": 10,
        "shape": [1, 8, 8],
        "mean": [0.3053],
        "std": [0.376],
        "certify_n": 10000,
        "test_fraction": 0.2,
        "split_seed": 0,
        "batch_size": 64,
        "eval_batch_size": 256,
        "num_workers": 0,
        "seed": 0,
    },
    "training": "standard",
    "stability_weight": 6.0,
    "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "momentum": 0.9, "nesterov": True},
    "scheduler": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True, "T_max": 1},
    "denoiser": {"name": "none"},
    "seed": 0,
}


def save_checkpoint(path, hp=None, state_dict=None):
    """An ssn_exp checkpoint as load_checkpoint reads it: the hyper-parameters and the weights of their module."""
    hp = copy.deepcopy(HPARAMS) if hp is None else hp
    if state_dict is None:
        torch.manual_seed(0)
        state_dict = SmoothedTraining(**HPARAMS).state_dict()
    torch.save({"hyper_parameters": hp, "state_dict": state_dict}, path)
    return path


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return SmoothedTraining(**HPARAMS).state_dict()


# -- the payloads: each has a side effect (a marker file) when instantiated --------------------------------------------
def payloads(tmp_path) -> dict:
    """name -> (a config node that, instantiated, creates the marker ``tmp_path / name``)."""
    out = {}
    out["write_text"] = {
        "_target_": "pathlib.Path.write_text",
        "_args_": [{"_target_": "pathlib.Path", "_args_": [str(tmp_path / "write_text")]}, "pwned"],
    }

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'numpy_load'}",))

    pickled = tmp_path / "payload.npy"
    pickled.write_bytes(pickle.dumps(Payload()))
    out["numpy_load"] = {"_target_": "numpy.load", "file": str(pickled), "allow_pickle": True}
    hub = tmp_path / "hub"
    hub.mkdir(exist_ok=True)
    (hub / "hubconf.py").write_text(
        f"import pathlib\npathlib.Path({str(tmp_path / 'hub_load')!r}).write_text('pwned')\ndef net():\n    return None\n"
    )
    out["hub_load"] = {"_target_": "torch.hub.load", "repo_or_dir": str(hub), "model": "net", "source": "local"}
    out["os_system"] = {"_target_": "os.system", "_args_": [f"touch {tmp_path / 'os_system'}"]}
    return out


PAYLOAD_NAMES = ["write_text", "numpy_load", "hub_load", "os_system"]


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_each_payload_is_live_when_instantiated_unchecked(tmp_path, name):
    """The payloads below are real: Hydra's own instantiate runs them, its block-list does not stop them (it does
    stop os.system in this Hydra version, so that one is shown live by calling its target directly)."""
    node = payloads(tmp_path)[name]
    try:
        if name == "os_system":
            os.system(*node["_args_"])
        else:
            instantiate(node)
    except Exception:  # noqa: BLE001 - some fail after their side effect (hub's net() returns None)
        pass
    assert (tmp_path / name).exists()


#: where a payload is planted: the top of a config, inside _args_, a _partial_ node, and the data / denoiser configs
PLACES = {
    "model": lambda hp, p: hp.__setitem__("model", p),
    "model._args_": lambda hp, p: hp["model"].__setitem__("_args_", [p]),
    "model.width": lambda hp, p: hp["model"].__setitem__("width", p),
    "optimizer": lambda hp, p: hp.__setitem__("optimizer", {**p, "_partial_": True}),
    "scheduler.nested.list": lambda hp, p: hp["scheduler"].__setitem__("extra", [[{"x": p}]]),
    "data": lambda hp, p: hp.__setitem__("data", {**hp["data"], "_target_": p["_target_"]}),
    "denoiser.net": lambda hp, p: hp.__setitem__("denoiser", {"name": "mse", "net": p}),
    "method.seed": lambda hp, p: hp["method"].__setitem__("seed", p),
}


@pytest.mark.parametrize("place", sorted(PLACES))
@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_a_planted_payload_is_refused_in_one_line_with_no_side_effect(tmp_path, weights, name, place):
    hp = copy.deepcopy(HPARAMS)
    PLACES[place](hp, payloads(tmp_path)[name])
    ckpt = save_checkpoint(tmp_path / "planted.ckpt", hp, weights)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    msg = str(err.value)
    assert "\n" not in msg and f"cannot rebuild the model of {ckpt}" in msg, msg
    assert "_target_=" in msg, msg
    assert "trust_targets=[" not in msg, msg  # stdlib / library code: trusting its module is never suggested
    assert "hyper_parameters." in msg  # names the key
    assert not (tmp_path / name).exists()


def test_aliases_are_resolved_to_the_object_they_name():
    importlib.import_module("ssn_exp.cli.errors")  # imported: an alias inside it resolves (and is refused)
    trust = Trust()
    with pytest.raises(UntrustedTarget, match=r"ssn_exp\.models\.torch\.hub\.load"):
        trust.check({"_target_": "ssn_exp.models.torch.hub.load"}, "x")
    with pytest.raises(UntrustedTarget, match="not a class or function"):
        trust.check({"_target_": "ssn_exp.cli.errors.os.system"}, "x")  # a module of ours that imports os
    trust.check({"_target_": "ssn_exp.models.torch.optim.SGD"}, "x")  # the very object torch.optim.SGD: allowed
    with pytest.raises(UntrustedTarget, match="distributions"):  # another object of an allowed name (Uniform)
        trust.check({"_target_": "torch.distributions.Uniform"}, "x")
    with pytest.raises(UntrustedTarget, match="not a class or function"):  # a module is not a callable to build
        trust.check({"_target_": "ssn_exp.models.torch"}, "x")


def test_a_module_named_only_by_a_file_is_not_imported(tmp_path, monkeypatch):
    name = f"evil_ssn_mod_{uuid.uuid4().hex}"  # fresh per run (mutmut runs the tests twice in one process)
    (tmp_path / f"{name}.py").write_text(
        f"import pathlib\npathlib.Path({str(tmp_path / 'imported')!r}).write_text('x')\n"
        "import torch\nclass Net(torch.nn.Linear):\n    def __init__(self):\n        super().__init__(64, 10)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    node = {"_target_": f"{name}.Net"}
    with pytest.raises(UntrustedTarget, match=rf"imports no module a file names.*trust_targets=\[{name}\]"):
        Trust().check(node, "x")
    assert not (tmp_path / "imported").exists() and name not in sys.modules
    Trust(modules=[name]).check(node, "x")  # the user trusts their package: imported and allowed
    assert (tmp_path / "imported").exists()
    del sys.modules[name]  # (monkeypatch.delitem would put it back at teardown)


def test_a_submodule_of_a_trusted_package_is_not_imported_because_a_file_names_it(capsys):
    """Issue 23 §2: importing torch.utils.model_dump.__main__ runs a command-line tool (usage text, exit 2); a file
    naming it is refused before any import. Only modules on a trusted target's path, or trust_targets', are imported."""
    name = "torch.utils.model_dump.__main__"
    assert name not in sys.modules and importlib.util.find_spec("torch.utils.model_dump") is not None  # it exists
    with pytest.raises(UntrustedTarget, match=r"imports no module a file names$"):
        Trust().check({"_target_": f"{name}.main"}, "x")
    with pytest.raises(UntrustedTarget, match="imports no module a file names"):
        Trust().check({"_target_": "torch.utils.model_dump.main"}, "x")
    assert "torch.utils.model_dump" not in sys.modules and name not in sys.modules
    assert capsys.readouterr().out == ""


def test_a_trusted_package_s_submodule_is_imported_when_the_user_names_the_package(tmp_path, monkeypatch):
    name = f"evil_ssn_pkg_{uuid.uuid4().hex}"  # fresh per run (mutmut runs the tests twice in one process)
    pkg = tmp_path / name
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text(
        "import torch\nclass Net(torch.nn.Linear):\n    def __init__(self):\n        super().__init__(64, 10)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    node = {"_target_": f"{name}.sub.Net"}
    with pytest.raises(UntrustedTarget, match=rf"trust_targets=\[{name}\.sub\]"):  # user code: the hint
        Trust().check(node, "x")
    assert name not in sys.modules
    Trust(modules=[name]).check(node, "x")
    assert f"{name}.sub" in sys.modules
    for mod in (f"{name}.sub", name):
        del sys.modules[mod]  # (monkeypatch.delitem would put them back at teardown)


def test_interpolations_and_non_names_are_refused():
    for node, words in [
        ({"a": {"_target_": "${oc.env:HOME}"}}, "a._target_ holds an interpolation"),
        ({"model": {"width": "${oc.env:HOME}"}}, "model.width holds an interpolation"),
        ({"_target_": 5}, "must be a dotted name"),
        ({"_target_": "os.system; rm"}, "must be a dotted name"),
        ({"a": [[[[{"_target_": "os.system"}]]]]}, "a.0.0.0.0._target_='os.system'"),
    ]:
        with pytest.raises(UntrustedTarget, match=words.replace(".", r"\.").replace("(", r"\(")):
            Trust().check(node, "x")
    deep: dict = {}
    node = deep
    for _ in range(200):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(UntrustedTarget, match="nested deeper than"):
        Trust().check(deep, "x")


def test_own_targets_are_every_target_of_the_package_configs_except_the_machinery():
    own = own_targets()
    for name in ("ssn_exp.models.DigitsCNN", "ssn_exp.noises.DSSN", "ssn_exp.lightning.data.DigitsData"):
        assert name in own
    assert {"torch.optim.SGD", "ssn_exp.models.DnCNN", "torchvision.models.resnet50"} <= own
    assert "pytorch_lightning.Trainer" not in own and not any("loggers" in t for t in own)
    # the callbacks group's targets (LearningRateMonitor, EarlyStopping, ModelCheckpoint) are the user's run, not a file's
    assert not any("callbacks" in t for t in own)


USER_MODEL = {
    "_target_": "torch.nn.Sequential",
    "_args_": [
        {"_target_": "torch.nn.Flatten"},
        {"_target_": "torch.nn.Linear", "in_features": 64, "out_features": 10},
    ],
}


def test_a_model_of_the_users_own_loads_once_trusted(tmp_path):
    hp = {**copy.deepcopy(HPARAMS), "model": USER_MODEL}
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "user.ckpt", hp, SmoothedTraining(**hp).state_dict())
    with pytest.raises(CheckpointError, match=r"torch\.nn\.Sequential.*optimizers and schedulers are\)$"):
        load_checkpoint(ckpt)  # (a library's module is never suggested for trust_targets)
    assert load_checkpoint(ckpt, trust=Trust(modules=["torch.nn"])).identity()["model"] == "torch.nn.Sequential"
    # or the same model config in the run's own config (model=user_mlp on the command line)
    cfg = OmegaConf.create({"model": USER_MODEL, "trust_targets": []})
    assert load_checkpoint(ckpt, trust=Trust.from_config(cfg)).identity()["model"] == "torch.nn.Sequential"
    # trusting a module trusts callables defined there, not whatever it imports
    with pytest.raises(CheckpointError, match="os.system"):
        load_checkpoint(
            save_checkpoint(
                tmp_path / "alias.ckpt", {**hp, "optimizer": {"_target_": "torch.nn.modules.module.os.system"}}
            ),
            trust=Trust(modules=["torch.nn"]),
        )


def test_trust_targets_must_be_module_names():
    for bad in ([5], ["a b"], [["x"]]):
        with pytest.raises(UntrustedTarget, match="trust_targets must list module names"):
            Trust.from_config({"trust_targets": bad})


def test_own_checkpoints_keep_loading(tmp_path, weights):
    module = load_checkpoint(save_checkpoint(tmp_path / "good.ckpt", state_dict=weights))
    assert module.identity()["model"] == "ssn_exp.models.DigitsCNN" and not module.training
    hp = {**copy.deepcopy(HPARAMS), "denoiser": {"name": "mse", "net": {"_target_": "ssn_exp.models.DnCNN",
                                                                         "in_channels": 1, "depth": 3, "width": 4}}}  # fmt: skip
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "den.ckpt", hp, SmoothedTraining(**hp).state_dict())
    assert load_checkpoint(ckpt).identity()["denoiser"] == "mse"


# -- §4: damaged checkpoints are one line naming the real cause --------------------------------------------------------
def _edited(**changes):
    hp = copy.deepcopy(HPARAMS)
    for key, value in changes.items():
        node, *path = key.split("__")
        target = hp
        for part in [node, *path][:-1]:
            target = target[part]
        if value is _DELETE:
            del target[[node, *path][-1]]
        else:
            target[[node, *path][-1]] = value
    return hp


_DELETE = object()
DAMAGED = [
    (["a", "list"], "its hyper_parameters is a list"),
    (_edited(model="ssn_exp.models.DigitsCNN"), "written by an older ssn_exp (its model config is a str"),
    (_edited(method=_DELETE), "written by an older ssn_exp (its method config is none"),
    (_edited(seed=_DELETE), "lacks hyper-parameter(s) seed (it would silently use seed 0)"),
    (_edited(training=_DELETE, scheduler=_DELETE), "lacks hyper-parameter(s) training, scheduler"),
    (_edited(model__num_classes="ten"), "cannot rebuild the model of"),
    (_edited(model___target_="ssn_exp.models.NoSuchNet"), "ssn_exp.models.NoSuchNet does not exist"),
    (_edited(surprise=1), "hyper-parameters this ssn_exp does not know (surprise)"),
    (_edited(seed=-1), "hyper_parameters.seed is -1, it must be an integer"),
    (_edited(seed="0"), "hyper_parameters.seed is '0'"),
    (_edited(training="fancy"), "hyper_parameters.training is 'fancy'"),
    (_edited(stability_weight=float("nan")), "hyper_parameters.stability_weight is nan"),
    (_edited(optimizer=[1]), "hyper_parameters.optimizer is [1]"),
    (_edited(denoiser={"name": "magic"}), "hyper_parameters.denoiser is {'name': 'magic'}"),
    (_edited(denoiser={"name": "mse"}), "hyper_parameters.denoiser.net must be a _target_ config"),
    (_edited(data=[1, 2]), "hyper_parameters.data is [1, 2]"),
    (_edited(data__q="16"), "hyper_parameters.data.q is '16'"),
    (_edited(data__shape=[1, 8]), "hyper_parameters.data.shape is [1, 8]"),
    (_edited(data__shape=[1, 8, 8, 8]), "hyper_parameters.data.shape"),
    (_edited(data__mean=[0.3, 0.3]), "hyper_parameters.data.mean is [0.3, 0.3]"),
    (_edited(data__std=[0.0]), "hyper_parameters.data.std is [0.0], it must be positive"),
    (_edited(data__name=_DELETE), "hyper_parameters.data.name is None"),
    # an edited data config: the noise and the weights were built for the data set the run had
    (_edited(data__q=255), "method.q=16 does not fit the stored data set (digits: q 255); the checkpoint was edited"),
    (_edited(data__shape=[3, 8, 8], data__mean=[0.3] * 3, data__std=[0.4] * 3), "method.dim=64 does not fit"),
    (_edited(data__mean=[0.5]), "hyper_parameters.data.mean [0.5] is not the normalisation its weights were trained"),
    (_edited(data__std=[0.2]), "hyper_parameters.data.std [0.2] is not the normalisation"),
]


@pytest.mark.parametrize("hp, words", DAMAGED, ids=[w[:40] for _, w in DAMAGED])
def test_damaged_or_edited_checkpoints_are_one_line(tmp_path, weights, hp, words):
    ckpt = save_checkpoint(tmp_path / "bad.ckpt", hp, weights)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    msg = str(err.value)
    assert "\n" not in msg and str(ckpt) in msg, msg
    assert words in msg, msg


def test_a_config_asking_for_a_larger_network_than_its_weights_is_refused_before_building_it(tmp_path, weights):
    """Sizes come from the stored config: the networks are first built on the meta device and compared with the
    weights in the file, so an edited width costs no memory (the real build would allocate 300 MB here)."""
    ckpt = save_checkpoint(tmp_path / "wide.ckpt", _edited(model__width=2048), weights)
    with pytest.raises(CheckpointError, match=r"size mismatch for model\.1\.features\.0\.weight: the file has "
                       r"\[4, 1, 3, 3\], the model config builds \[2048, 1, 3, 3\]"):  # fmt: skip
        load_checkpoint(ckpt)
    hp = {**copy.deepcopy(HPARAMS), "denoiser": {"name": "mse", "net": {"_target_": "ssn_exp.models.DnCNN",
                                                                         "in_channels": 1, "depth": 3, "width": 4}}}  # fmt: skip
    torch.manual_seed(0)
    sd = SmoothedTraining(**hp).state_dict()
    hp["denoiser"]["net"]["width"] = 4096
    with pytest.raises(CheckpointError, match=r"model\.denoiser\.net\.0\.weight.*the denoiser\.net config builds"):
        load_checkpoint(save_checkpoint(tmp_path / "den.ckpt", hp, sd))


def test_the_allow_list_module_imports_without_torch():
    import subprocess

    code = "import sys, ssn_exp.trust; assert 'torch' not in sys.modules and 'hydra' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_state_dict_that_is_not_tensors_is_refused(tmp_path, weights):
    for sd in ([1, 2], {"model.0.mean": 3}, {1: torch.zeros(1)}):
        with pytest.raises(CheckpointError, match="state_dict is not a dict of named tensors"):
            load_checkpoint(save_checkpoint(tmp_path / "sd.ckpt", state_dict=sd))


def test_an_edited_data_set_does_not_certify(tmp_path, weights):
    """Certification cross-checks the data set against the model's output and the noise, not only against the
    stored data config (which an edit changes together with the data set)."""
    from ssn_exp.cli.certify import _check_data_fits
    from ssn_exp.cli.config import ConfigError
    from ssn_exp.exceptions import UserError
    from ssn_exp.lightning.data import ImageData

    ckpt = save_checkpoint(tmp_path / "good.ckpt", state_dict=weights)
    facts = {k: HPARAMS["data"][k] for k in ("name", "q", "num_classes", "shape", "mean", "std")}
    _check_data_fits(ImageData(**facts), load_checkpoint(ckpt), ckpt)  # the real data set: accepted
    module = load_checkpoint(ckpt)
    module.hparams.data["num_classes"] = 5  # stored data config and data set edited together
    with pytest.raises(UserError, match=r"of .*good.ckpt gives 10 logits per input; expected num_classes=5"):
        _check_data_fits(ImageData(**{**facts, "num_classes": 5}), module, ckpt)
    module = load_checkpoint(ckpt)
    module.hparams.data["shape"] = [1, 16, 16]
    with pytest.raises(ConfigError, match="was built for q=16, dim=64, the data set digits has q=16, dim=256"):
        _check_data_fits(ImageData(**{**facts, "shape": [1, 16, 16]}), module, ckpt)
    module = load_checkpoint(ckpt)
    module.hparams.data["q"] = 255
    with pytest.raises(ConfigError, match="built for q=16, dim=64, the data set digits has q=255, dim=64"):
        _check_data_fits(ImageData(**{**facts, "q": 255}), module, ckpt)


# -- the other files that can name code: stage checkpoints, a run folder on resume ----------------------------------
def test_a_planted_stage_checkpoint_is_refused(tmp_path):
    from ssn_exp.lightning.denoiser_stages import StageModule, load_stage

    stage_hp = {"kind": "clean", "model": HPARAMS["model"], "data": HPARAMS["data"], "method": None,
                "denoiser_net": None, "optimizer": None, "denoiser_lr": 1e-3, "seed": 0}  # fmt: skip
    torch.manual_seed(0)
    sd = StageModule(**stage_hp).state_dict()
    good = tmp_path / "good.ckpt"
    torch.save({"hyper_parameters": stage_hp, "state_dict": sd}, good)
    assert load_stage(good).hparams.kind == "clean"
    for name, payload in payloads(tmp_path).items():
        bad = tmp_path / f"{name}.ckpt"
        torch.save({"hyper_parameters": {**stage_hp, "model": payload}, "state_dict": sd}, bad)
        with pytest.raises(
            CheckpointError, match=rf"cannot rebuild the stage of {bad}: hyper_parameters\.model\._target_"
        ):
            load_stage(bad)
        assert not (tmp_path / name).exists()
    for hp, words in [([1], "not a denoiser-stage checkpoint"), ({**stage_hp, "x": 1}, "does not know (x)"),
                      ({**stage_hp, "model": "net"}, "model is str, not a config")]:  # fmt: skip
        torch.save({"hyper_parameters": hp, "state_dict": sd}, tmp_path / "bad.ckpt")
        with pytest.raises(CheckpointError, match=words.replace("(", r"\(").replace(")", r"\)")):
            load_stage(tmp_path / "bad.ckpt")


def test_a_planted_run_folder_is_refused_on_resume(tmp_path, weights):
    from ssn_exp.cli.train import _resume_point

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = OmegaConf.create({"resume": True, "trust_targets": []})
    for name, payload in payloads(tmp_path).items():
        save_checkpoint(run / "checkpoints" / "last.ckpt", {**copy.deepcopy(HPARAMS), "model": payload}, weights)
        with pytest.raises(CheckpointError, match=r"hyper_parameters\.model\._target_"):
            _resume_point(cfg, run, copy.deepcopy(HPARAMS), {})
        assert not (tmp_path / name).exists()
    save_checkpoint(run / "checkpoints" / "last.ckpt", ["not", "a", "dict"], weights)
    with pytest.raises(CheckpointError, match="its hyper_parameters is a list"):
        _resume_point(cfg, run, copy.deepcopy(HPARAMS), {})
    save_checkpoint(run / "checkpoints" / "last.ckpt", state_dict=weights)
    assert _resume_point(cfg, run, copy.deepcopy(HPARAMS), {}) == str(run / "checkpoints" / "last.ckpt")


def test_every_instantiation_site_is_known():
    """Each place that turns a config into a call is one whose input is the user's config or is checked first
    (load_checkpoint / load_stage / certify's data config); a new one must be reviewed and added here."""
    import re
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "ssn_exp"
    found = set()
    for path in src.rglob("*.py"):
        for line in path.read_text().splitlines():
            if re.search(r"\b(instantiate|get_class|get_method|_locate|import_module)\(", line) and "def " not in line:
                found.add(str(path.relative_to(src)))
    assert found == {
        "cli/config.py",  # build(): the user's composed config
        "certify/__init__.py",  # lazy imports of its own submodules (names fixed in the module)
        "cli/certify.py",  # the user's method name; the data config after Trust.check
        "lightning/module.py",  # SmoothedTraining: the user's config, or checked_hparams() in load_checkpoint
        "lightning/checkpoint.py",  # check_sizes (meta device): after checked_hparams() / load_stage's Trust.check
        "lightning/denoiser_stages.py",  # StageModule: the user's config, or Trust.check in load_stage
        "smoothing.py",  # the deprecated module's names come from ssn_exp.noises (a fixed module)
        "trust.py",  # imports only modules already trusted
    }, found


@pytest.mark.slow
def test_certify_refuses_a_planted_checkpoint_in_one_line(tmp_path, weights):
    """The entry point: one ``error:`` line, exit 2, no run directory, and the payload did not run."""
    hp = copy.deepcopy(HPARAMS)
    hp["model"]["_args_"] = [payloads(tmp_path)["os_system"]]
    hp["data"]["_target_"] = "pathlib.Path.write_text"
    ckpt = save_checkpoint(tmp_path / "planted.ckpt", hp, weights)
    dump = {**copy.deepcopy(HPARAMS), "model": {"_target_": "torch.utils.model_dump.__main__.main"}}  # issue 23 §2
    dump_ckpt = save_checkpoint(tmp_path / "dump.ckpt", dump, weights)
    out = tmp_path / "out"
    p, q = run_cli_many([("ssn_exp.certify", [f"ckpt={c}", f"hydra.run.dir={d}"])
                         for c, d in ((ckpt, out), (dump_ckpt, tmp_path / "out2"))], workers=2)  # fmt: skip
    assert q.returncode == 2 and "usage" not in (q.stdout + q.stderr).lower(), q.stdout + q.stderr[-3000:]
    assert q.stderr.strip().splitlines() == [
        f"error: cannot rebuild the model of {dump_ckpt}: hyper_parameters.model._target_="
        "'torch.utils.model_dump.__main__.main' cannot be resolved (torch.utils.model_dump does not exist or is not "
        "trusted); ssn_exp imports no module a file names"
    ]
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith(f"error: cannot rebuild the model of {ckpt}: hyper_parameters."), lines
    assert "'os.system'" in lines[0] or "'pathlib.Path.write_text'" in lines[0]
    assert "trust_targets=[" not in lines[0]  # never suggests trusting posix or pathlib
    assert not (tmp_path / "os_system").exists() and not out.exists()


def test_a_pickle_payload_is_named_as_what_it_is(tmp_path):
    """Issue 23 §7: a checkpoint holding pickled objects is said to be one (refused by weights_only loading), as
    torch.save and a bare pickle write it; bytes that are no pickle at all stay 'not a torch checkpoint'."""
    from ssn_exp.models import read_checkpoint

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"state_dict": Payload()}, tmp_path / "saved.ckpt")
    (tmp_path / "bare.ckpt").write_bytes(pickle.dumps({"state_dict": Payload()}))
    (tmp_path / "noise.ckpt").write_bytes(bytes(range(7, 256)) * 4)
    for name, words in [("saved", r"holds a pickled Python object \(posix\.system\), which ssn_exp refuses"),
                        ("bare", "holds pickled Python objects, which ssn_exp refuses to load"),
                        ("noise", "not a torch checkpoint$")]:  # fmt: skip
        with pytest.raises(CheckpointError, match=words):
            read_checkpoint(tmp_path / f"{name}.ckpt")
    assert not (tmp_path / "ran").exists()


# -- the training state a resume restores (issue 23 §1) ---------------------------------------------------------------
RESUME = ["debug=fast", "trainer.enable_progress_bar=false", "certify.enabled=false", "training.epochs=2"]


def _forge(path, edit) -> None:
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    target = os.path.realpath(path)  # last.ckpt links to the epoch checkpoint: rewrite that file
    torch.save(ckpt, target)


def _paths_everywhere(victim, link):
    def edit(ckpt):
        (state,) = ckpt["callbacks"].values()
        state.update(best_model_path=f"{link.parent}/{os.path.relpath(victim, link.parent)}", last_model_path=str(victim),
                     kth_best_model_path=str(link), best_k_models={str(victim): torch.tensor(0.0), str(link): torch.tensor(1.0)},
                     dirpath=str(victim.parent))  # fmt: skip

    return edit


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A real run stopped after epoch 0 of 2 (what a killed run leaves)."""
    first = tmp_path_factory.mktemp("resume") / "first"
    p = run_cli("ssn_exp", *RESUME, "trainer.max_epochs=1", f"hydra.run.dir={first}")
    assert p.returncode == 0, p.stderr[-3000:]
    return first


@pytest.mark.slow
def test_a_resume_removes_nothing_a_checkpoint_names(tmp_path, stopped_run):
    """The attack of issue 23 §1 (ModelCheckpoint's best_model_path = <checkpoints>/../../victim made Lightning delete
    ``victim`` recursively on resume), with every path of the callback state forged at once (relative ``..``, absolute,
    a link inside the folder pointing out, best_k_models keys): the run resumes exactly as an untouched copy does and
    nothing outside the run is removed."""
    import shutil

    victim = tmp_path / "victim"
    (victim / "inner").mkdir(parents=True)
    (victim / "inner" / "precious.ckpt").write_text("keep")
    runs = {name: tmp_path / name for name in ("control", "paths")}
    for run in runs.values():
        shutil.copytree(stopped_run, run, symlinks=True)
    link = runs["paths"] / "checkpoints" / "outside.ckpt"
    link.symlink_to(victim / "inner" / "precious.ckpt")
    _forge(runs["paths"] / "checkpoints" / "last.ckpt", _paths_everywhere(victim, link))
    done = run_cli_many([("ssn_exp", [*RESUME, f"hydra.run.dir={run}"]) for run in runs.values()], workers=2)
    assert (victim / "inner" / "precious.ckpt").is_file() and link.is_symlink()
    for (name, run), p in zip(runs.items(), done, strict=True):
        assert p.returncode == 0, p.stderr[-3000:]
        assert sorted(os.listdir(run / "checkpoints")) == sorted(
            ["epoch001.ckpt", "last.ckpt"] + (["outside.ckpt"] if name == "paths" else [])
        )
    control, forged = (torch.load(run / "checkpoints" / "last.ckpt", weights_only=True) for run in runs.values())
    assert all(torch.equal(control["state_dict"][k], forged["state_dict"][k]) for k in control["state_dict"])
    assert control["optimizer_states"][0]["param_groups"] == forged["optimizer_states"][0]["param_groups"]
    assert control["lr_schedulers"] == forged["lr_schedulers"] and control["loops"] == forged["loops"]


IMPOSSIBLE = {
    "epoch": (lambda c: c.update(epoch=10**9), "its epoch / global_step"),
    "loops": (lambda c: c["loops"]["fit_loop"]["epoch_progress"]["current"].update(completed=10**9), "its loop state"),
    "steps": (lambda c: c["loops"]["fit_loop"]["epoch_loop.state_dict"].update(x=-1), "its loop state"),
    "momentum": (lambda c: c["optimizer_states"][0]["state"][0].update(momentum_buffer=torch.zeros(3)), "optimizer"),
    "nan": (lambda c: c["optimizer_states"][0]["state"][1].update(momentum_buffer=torch.tensor(float("nan"))),
            "optimizer state does not fit"),
    "scheduler": (lambda c: c["lr_schedulers"][0].update(last_epoch=2**40), "its scheduler has made"),
}  # fmt: skip


@pytest.mark.slow
def test_a_resume_refuses_a_training_state_no_run_could_save(tmp_path, stopped_run):
    """Loop counters, optimizer and scheduler state that the run could not have saved: one CheckpointError from
    Lightning's restore (before anything trains), the rest rebuilt from the run's config (the learning rate a forged
    file holds is not used)."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from ssn_exp.lightning.callbacks import epoch_checkpoint

    good = torch.load(stopped_run / "checkpoints" / "last.ckpt", weights_only=True)
    for name, (edit, words) in IMPOSSIBLE.items():
        ckpt = copy.deepcopy(good)
        edit(ckpt)
        folder = tmp_path / name / "checkpoints"
        folder.mkdir(parents=True)
        torch.save(ckpt, folder / "last.ckpt")
        module = SmoothedTraining(**good["hyper_parameters"])
        data = instantiate({**good["hyper_parameters"]["data"], "num_workers": 0})
        trainer = pl.Trainer(max_epochs=2, callbacks=[epoch_checkpoint(folder)], logger=False, limit_train_batches=1,
                             limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        with pytest.raises(CheckpointError, match=f"cannot resume from {folder / 'last.ckpt'}: .*{words}"):
            trainer.fit(module, datamodule=data, ckpt_path=str(folder / "last.ckpt"), weights_only=True)
        assert sorted(os.listdir(folder)) == ["last.ckpt"], name


def test_checking_a_checkpoint_costs_at_most_a_multiple_of_its_size(tmp_path, weights):
    """Issue 23 §7: a small file whose model is a WideResNet of depth 10^6 was built (on the meta device, but module by
    module: 5.5 GB after 4 minutes) to compare its sizes; the build now stops once it outgrows the stored tensors."""
    import time

    hp = copy.deepcopy(HPARAMS)
    hp["model"] = {"_target_": "ssn_exp.models.WideResNet", "depth": 10**6, "widen": 1, "num_classes": 10,
                   "in_channels": 1}  # fmt: skip
    ckpt = save_checkpoint(tmp_path / "deep.ckpt", hp, weights)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"the model config builds a network of more modules and tensors than"):
        load_checkpoint(ckpt)
    assert time.monotonic() - start < 10
    from ssn_exp.lightning.denoiser_stages import StageModule, load_stage  # a stage checkpoint: the same bound

    stage_hp = {"kind": "clean", "model": HPARAMS["model"], "data": HPARAMS["data"], "method": None,
                "denoiser_net": None, "optimizer": None, "denoiser_lr": 1e-3, "seed": 0}  # fmt: skip
    sd = StageModule(**stage_hp).state_dict()
    torch.save({"hyper_parameters": {**stage_hp, "model": hp["model"]}, "state_dict": sd}, tmp_path / "stage.ckpt")
    with pytest.raises(CheckpointError, match=r"the model config builds a network of more modules and tensors than"):
        load_stage(tmp_path / "stage.ckpt")
    assert time.monotonic() - start < 20


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["ssn_exp", "ssn_exp.certify"])
def test_a_hand_placed_hpc_checkpoint_is_refused_before_lightning_loads_it(tmp_path, stopped_run, entry):
    """Inside a Slurm job Lightning's ``fit``/``predict`` with no checkpoint load ``hpc_ckpt_<n>.ckpt`` from the
    trainer's root folder, unchecked. Our runs never write one, so a run (or a certification) whose folder holds one
    is refused in one line before Lightning can load it: with Slurm's variables set, as inside a job."""
    run = tmp_path / "run"
    run.mkdir()
    planted = run / "hpc_ckpt_1.ckpt"
    planted.write_bytes((stopped_run / "checkpoints" / "last.ckpt").read_bytes())
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "job", "SLURM_JOB_ID": "7"}
    args = [*RESUME, f"hydra.run.dir={run}"] if entry == "ssn_exp" else [
        f"ckpt={stopped_run / 'checkpoints' / 'last.ckpt'}", "debug=fast", "certify.max_examples=4", f"hydra.run.dir={run}"]  # fmt: skip
    p = run_cli(entry, *args, env=slurm)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "hpc_ckpt_1.ckpt" in lines[-1], p.stderr[-2000:]
    assert not (run / "checkpoints").exists() and not (run / "certificates.csv").exists()


def test_a_moved_name_resolves_through_ssn_exp_s_own_shim_only(monkeypatch):
    """Checkpoints written before ``ssn_exp.noises`` name ``ssn_exp.smoothing.DSSN``: the shim's module
    ``__getattr__`` is asked (its DeprecationWarning silenced, even where warnings are errors); another package's
    module ``__getattr__`` never is, nor an ssn_exp module without one."""
    import types
    import warnings

    import ssn_exp.noises
    import ssn_exp.smoothing

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Trust().resolve("ssn_exp.smoothing.DSSN") is ssn_exp.noises.DSSN
        assert Trust().resolve("ssn_exp.smoothing.Smoothing") is ssn_exp.noises.Noise
        with pytest.raises(LookupError, match="ssn_exp.smoothing.Nothing does not exist"):
            Trust().resolve("ssn_exp.smoothing.Nothing")
    Trust().check({"_target_": "ssn_exp.smoothing.DSSN"}, "x")  # (allowed: it is the noise itself)
    lazy = types.ModuleType("ssn_lazy_mod")
    lazy.__getattr__ = lambda name: print  # another package's lazy attributes: never asked
    monkeypatch.setitem(sys.modules, "ssn_lazy_mod", lazy)
    with pytest.raises(LookupError, match="ssn_lazy_mod.anything does not exist"):
        Trust(modules=["ssn_lazy_mod"]).resolve("ssn_lazy_mod.anything")
    with pytest.raises(LookupError, match="ssn_exp.noises.Nothing does not exist"):
        Trust().resolve("ssn_exp.noises.Nothing")
