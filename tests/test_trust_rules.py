"""The rules of :mod:`ssn_exp.trust`, one by one and in process (the end-to-end refusals are in test_trust.py):
how a config tree is walked, which names resolve and which modules may be imported for it, what is allowed, and
the exact one-line messages a user reads."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from omegaconf import OmegaConf

from ssn_exp.trust import MAX_DEPTH, Trust, UntrustedTarget, targets_in


def _nested(depth: int) -> dict:
    tree: dict = {"_target_": "torch.optim.SGD"}
    for _ in range(depth):
        tree = {"a": tree}
    return tree


def test_targets_are_found_in_dicts_lists_and_tuples_with_their_dotted_keys():
    tree = {"_target_": "x.A", "a": [{"_target_": "x.B"}, 3], "b": ({"c": {"_target_": "x.C"}},), "d": "x.D"}
    assert targets_in(tree) == [("_target_", "x.A"), ("a.0._target_", "x.B"), ("b.0.c._target_", "x.C")]
    assert targets_in([{"_target_": "x.E"}]) == [("0._target_", "x.E")]
    assert targets_in("x.F") == [] and targets_in({"my_target_": "x.G"}) == []


def test_nesting_is_bounded_at_max_depth():
    assert targets_in(_nested(MAX_DEPTH - 1))  # the target itself is one level below the last dict
    with pytest.raises(UntrustedTarget, match=rf"^model(\.a)+ is nested deeper than {MAX_DEPTH} levels$"):
        Trust().check(_nested(MAX_DEPTH + 1), "ckpt", prefix="model")


@pytest.mark.parametrize("modules", [None, [], ()])
def test_no_trust_targets_trusts_no_module(modules):
    assert Trust(modules=modules).modules == ()


def test_trust_targets_are_module_names():
    assert Trust(modules="mypkg.models").modules == ("mypkg.models",)  # one name alone is a list of one
    assert Trust(modules=["a", "b.c"]).modules == ("a", "b.c")
    for bad in ([1], ["a..b"], ["a b"], ["1a"], [None]):
        with pytest.raises(UntrustedTarget) as info:
            Trust(modules=bad)
        assert (
            str(info.value) == f"trust_targets must list module names such as [mypkg.models], got {bad[0]!r} in {bad!r}"
        )


def test_a_run_s_trust_is_its_config_s_targets_but_not_its_machinery():
    cfg = {
        "model": {"_target_": "mypkg.nets.Net"},
        "extra": [{"_target_": "mypkg.other.f"}],
        "trainer": {"_target_": "mypkg.trainer.T"},
        "logger": {"_target_": "mypkg.logger.L"},
        "callbacks": {"x": {"_target_": "mypkg.cb.C"}},
        "local": {"_target_": "mypkg.local.L"},
        "hydra": {"_target_": "mypkg.hydra.H"},
        "trust_targets": ["mytrusted"],
    }
    for tree in (cfg, OmegaConf.create(cfg)):
        trust = Trust.from_config(tree)
        assert {"mypkg.nets.Net", "mypkg.other.f"} <= trust.targets and trust.modules == ("mytrusted",)
        assert not {"mypkg.trainer.T", "mypkg.logger.L", "mypkg.cb.C", "mypkg.local.L", "mypkg.hydra.H"} & trust.targets
        assert trust._may_import("mypkg.nets") and trust._may_import("mypkg") and trust._may_import("mytrusted.sub")
        assert not trust._may_import("mypkg.cb") and not trust._may_import("mytrustedx")
    assert Trust.from_config(None).modules == () and Trust.from_config({"trust_targets": None}).modules == ()
    # an interpolation that cannot be resolved here: the raw values are taken (the run itself reports it)
    raw = Trust.from_config(OmegaConf.create({"model": {"_target_": "mypkg.nets.Net", "w": "${nope}"}}))
    assert "mypkg.nets.Net" in raw.targets
    assert "not a name" not in Trust(targets=["not a name", 3, "ok.Name"]).targets
    assert "ok.Name" in Trust(targets=["ok.Name"]).targets


def test_names_resolve_like_hydra_without_importing_untrusted_modules():
    trust = Trust()
    assert trust.resolve("torch.optim.SGD") is torch.optim.SGD
    assert trust.resolve("torch.optim.SGD.step") is torch.optim.SGD.step  # an attribute of a class
    assert trust.resolve("torch.optim.SGD") is trust.resolve("torch.optim.SGD")
    cases = {
        "nosuchmodule_xyz.Net": "module 'nosuchmodule_xyz' is not imported and not trusted",
        "torch.optim.NoSuch": "torch.optim.NoSuch does not exist or is not trusted",
        "torch.optim.SGD.nothing": "torch.optim.SGD.nothing does not exist or is not trusted",
        "torch.optim.SGD.step.x": "torch.optim.SGD.step is not a module or class",
        "torch.utils.model_dump.x": "torch.utils.model_dump does not exist or is not trusted",
    }
    for name, words in cases.items():
        with pytest.raises(LookupError) as info:
            trust.resolve(name)
        assert str(info.value) == words, name
    assert "torch.utils.model_dump" not in sys.modules or "model_dump imported by someone else"
    with pytest.raises(LookupError) as info:
        Trust(modules=["nosuchmodule_xyz"]).resolve("nosuchmodule_xyz.Net")
    assert str(info.value) == "module 'nosuchmodule_xyz' is not installed"


def test_what_is_allowed():
    import ssn_exp.noises  # noqa: F401

    trust = Trust()
    assert trust._allowed("torch.optim.SGD", torch.optim.SGD)
    assert not trust._allowed("ssn_exp.noises", sys.modules["ssn_exp.noises"])  # a module is never built
    assert not trust._allowed("ssn_exp.certify.procedures.Exact.name", "exact")  # nor what is not callable
    assert not trust._allowed("torch.optim.Adam", torch.optim.Adam)  # callable, but not one of ours
    # an alias of an allowed callable: the same object under another name
    assert trust._allowed("torch.optim.sgd.SGD", sys.modules["torch.optim.sgd"].SGD)
    assert not trust._allowed("x.SGD", lambda: None)  # an allowed short name, another object: refused
    assert not trust._allowed("x.SGD", print)
    user = Trust(modules=["mypkg.models"])
    f = types.FunctionType((lambda: None).__code__, {}, "Net")
    f.__module__, f.__qualname__ = "mypkg.models", "Net"
    assert user._allowed("anything.Net", f)
    f.__module__ = "mypkg.models.sub"
    assert user._allowed("anything.Net", f)
    f.__module__, f.__qualname__ = "mypkg", "models.Net"  # trusted by its full dotted name
    assert user._allowed("anything.Net", f)
    f.__module__, f.__qualname__ = "mypkg", "other"
    assert not user._allowed("anything.Net", f)
    f.__module__, f.__qualname__ = "mypkg.modelsx", "Net"
    assert not user._allowed("anything.Net", f)
    f.__module__ = None
    assert not user._allowed("anything.Net", f)
    g = type("G", (), {"__call__": lambda self: None, "__module__": "mypkg.models"})()
    assert callable(g) and not isinstance(getattr(g, "__qualname__", None), str) and user._allowed("x.Net", g)


def test_the_messages_a_user_reads():
    trust = Trust()
    trust.check({"model": {"_target_": "ssn_exp.models.DigitsCNN"}, "lr": 0.1}, "ckpt")  # ours: allowed
    cases = [
        ({"a": {"b": "${oc.env:HOME}"}}, "f: a.b holds an interpolation ('${oc.env:HOME}'); stored configs are "
         "resolved, so the file was edited: refusing to evaluate it"),
        ({"_target_": 3}, "f: _target_ must be a dotted name such as mypkg.Net, got 3"),
        ({"m": {"_target_": "a b"}}, "f: m._target_ must be a dotted name such as mypkg.Net, got 'a b'"),
        ({"_target_": "os.system"}, "f: _target_='os.system' is not a class or function ssn_exp builds from a file "
         "(only its own models, noises, data sets, denoisers, optimizers and schedulers are)"),
        ({"_target_": "nosuchmodule_xyz.Net"}, "f: _target_='nosuchmodule_xyz.Net' cannot be resolved (module "
         "'nosuchmodule_xyz' is not imported and not trusted); ssn_exp imports no module a file names; if it is "
         "your own code, trust it with trust_targets=[nosuchmodule_xyz] or name it in your own config"),
        ({"_target_": "torch.nn.Linear"}, "f: _target_='torch.nn.Linear' is not a class or function ssn_exp builds "
         "from a file (only its own models, noises, data sets, denoisers, optimizers and schedulers are)"),
    ]  # fmt: skip
    for tree, words in cases:
        with pytest.raises(UntrustedTarget) as info:
            trust.check(tree, "f")
        assert str(info.value) == words
    with pytest.raises(UntrustedTarget) as info:
        trust.check({"_target_": "x " * 50}, "f")
    assert str(info.value).endswith("got " + repr("x " * 50)[:80])


def test_a_refusal_names_the_module_that_holds_the_object(monkeypatch):
    """The hint names where the callable lives (what trust_targets must name), unless the name already says it."""
    holder = types.ModuleType("ssn_holder_mod")
    f = types.FunctionType((lambda: None).__code__, {}, "build")
    f.__module__ = "ssn_real_home"
    holder.build = f
    holder.own = types.FunctionType((lambda: None).__code__, {}, "own")
    holder.own.__module__ = "ssn_holder_mod.inner"
    holder.sub = types.ModuleType("ssn_holder_mod.sub")  # a package's subpackage re-exporting its inner callable
    holder.sub.deep = types.FunctionType((lambda: None).__code__, {}, "deep")
    holder.sub.deep.__module__ = "ssn_holder_mod.sub.inner"
    monkeypatch.setitem(sys.modules, "ssn_holder_mod", holder)
    for name, home in (("build", "ssn_real_home"), ("own", "ssn_holder_mod"), ("sub.deep", "ssn_holder_mod.sub")):
        with pytest.raises(UntrustedTarget) as info:
            Trust().check({"_target_": f"ssn_holder_mod.{name}"}, "f")
        assert str(info.value).endswith(f"trust it with trust_targets=[{home}] or name it in your own config")


def test_a_config_s_interpolations_are_resolved_before_its_targets_are_read():
    cfg = OmegaConf.create({"net": "mypkg.nets.Net", "model": {"_target_": "${net}"}})
    assert "mypkg.nets.Net" in Trust.from_config(cfg).targets


def test_a_name_in_the_targets_that_is_no_callable_is_still_refused():
    import ssn_exp.certify.procedures as procedures

    name = "ssn_exp.certify.procedures.Exact.name"
    trust = Trust(targets=[name])
    assert trust.resolve(name) == "exact" and not trust._allowed(name, procedures.Exact.name)
    assert not Trust(targets=["ssn_exp.noises"])._allowed("ssn_exp.noises", sys.modules["ssn_exp.noises"])


def test_an_interpolation_is_quoted_up_to_60_characters():
    value = "${" + "a" * 70 + "}"
    with pytest.raises(UntrustedTarget) as info:
        Trust().check({"k": value}, "f")
    assert str(info.value).startswith(f"f: k holds an interpolation ({value[:60]!r}); stored configs")


@pytest.mark.parametrize("name", ["builtins.exit", "builtins.help", "builtins.str.join", "builtins.object.__init__"])
def test_callables_without_a_name_or_a_module_are_refused_in_one_line(name):
    """``builtins.exit`` (an instance: no ``__name__``), ``str.join`` (a method descriptor: no ``__module__``)."""
    with pytest.raises(UntrustedTarget, match=rf"^f: _target_='{name}' is not a class or function ssn_exp builds"):
        Trust().check({"_target_": name}, "f")


def test_a_target_of_the_user_s_config_is_allowed_under_any_name(monkeypatch):
    """The user's config names it: allowed as named, even where the object's own name is another (an alias)."""
    mod = types.ModuleType("ssn_alias_mod")
    mod.alias = types.FunctionType((lambda: None).__code__, {}, "orig")
    mod.alias.__module__ = "ssn_alias_mod"
    monkeypatch.setitem(sys.modules, "ssn_alias_mod", mod)
    Trust(targets=["ssn_alias_mod.alias"]).check({"_target_": "ssn_alias_mod.alias"}, "f")
    with pytest.raises(UntrustedTarget, match="is not a class or function"):
        Trust().check({"_target_": "ssn_alias_mod.alias"}, "f")


def test_an_allowed_name_that_does_not_resolve_hides_no_other_alias():
    """Every allowed name with the object's short name is tried: those that do not resolve here are skipped."""
    trust = Trust(targets=[f"ssn_nomod{i}.SGD" for i in range(100)])  # (a set: tried in any order)
    trust.check({"_target_": "torch.optim.sgd.SGD"}, "f")  # the very object torch.optim.SGD, one of ours


def test_a_moved_module_is_imported_to_resolve_an_old_checkpoint_s_target(monkeypatch):
    """``ssn_exp.smoothing`` (the module older checkpoints name) is imported for them even where nothing did yet."""
    import ssn_exp
    import ssn_exp.noises

    monkeypatch.delitem(sys.modules, "ssn_exp.smoothing", raising=False)
    monkeypatch.delattr(ssn_exp, "smoothing", raising=False)
    assert Trust().resolve("ssn_exp.smoothing.DSSN") is ssn_exp.noises.DSSN
    assert "ssn_exp.smoothing" in sys.modules
