"""Fuzzing the checkpoint boundary (issue 16 §4): a real checkpoint with random edits (values replaced by junk,
keys deleted, payload targets planted at any depth) either loads or is refused with one-line
:class:`CheckpointError`; it never raises anything else and never runs a payload."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssn_exp.lightning.module import SmoothedTraining, load_checkpoint
from ssn_exp.models import CheckpointError
from test_trust import HPARAMS, payloads, save_checkpoint


def _paths(tree, prefix=()):
    """Every key path of a nested dict / list."""
    out = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out += _paths(value, (*prefix, key))
    return out


PATHS = _paths(HPARAMS)
#: where load_checkpoint builds from: a node planted there runs unless it is refused
BUILT = [p for p in PATHS if p[0] in ("model", "method")]
#: targets that must never run, and some that may
PAYLOAD_TARGETS = ["os.system", "pathlib.Path.write_text", "numpy.load", "torch.hub.load", "builtins.print",
                   "ssn_exp.models.torch.hub.load", "subprocess.run", "evil_mod.Net"]  # fmt: skip
SAFE_TARGETS = ["ssn_exp.models.DigitsCNN", "torch.optim.SGD", "ssn_exp.noises.Uniform", "ssn_exp.models.DnCNN"]

# sizes too: a width or an image size far larger than the weights is refused before it is allocated
junk_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.text(max_size=8),
    st.sampled_from(["${oc.env:HOME}", "digits", "exact", "none", "mse", "standard", "stability"]),
)
junk = st.recursive(
    junk_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


def _node(live: dict):
    """A payload shown live in test_trust (or an allowed target), with junk hydra keys / arguments added."""
    return st.builds(
        lambda base, extra: {**copy.deepcopy(base), **extra},
        st.one_of(
            st.sampled_from(list(live.values())),
            st.sampled_from([{"_target_": t} for t in PAYLOAD_TARGETS + SAFE_TARGETS]),
        ),
        st.dictionaries(st.sampled_from(["_partial_", "_recursive_", "_convert_", "width"]), junk_leaf, max_size=2),
    )


def edits(live: dict):
    value = st.one_of(junk, _node(live), st.just("DELETE"))
    return st.lists(st.tuples(st.sampled_from(PATHS), value), min_size=1, max_size=3)


def _apply(hp, path, value):
    node = hp
    for key in path[:-1]:
        if not isinstance(node, (dict, list)):
            return
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return
    if not isinstance(node, (dict, list)):
        return
    try:
        if value == "DELETE":
            del node[path[-1]]
        else:
            node[path[-1]] = copy.deepcopy(value)
    except (KeyError, IndexError, TypeError):
        return


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    return folder, SmoothedTraining(**HPARAMS).state_dict(), payloads(folder)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_edited_checkpoint_loads_or_is_one_line(fuzz, data):
    folder, weights, live = fuzz
    hp = copy.deepcopy(HPARAMS)
    mode = data.draw(st.integers(0, 9))
    if mode == 0:
        hp = data.draw(junk)  # the whole hyper-parameters replaced
    elif mode < 5:  # one node planted where the model and the noise are built from
        _apply(hp, data.draw(st.sampled_from(BUILT)), data.draw(_node(live)))
    else:
        for path, value in data.draw(edits(live)):
            _apply(hp, path, value)
    ckpt = save_checkpoint(folder / "fuzz.ckpt", hp, weights)
    try:
        module = load_checkpoint(ckpt)
    except CheckpointError as exc:
        assert "\n" not in str(exc) and str(exc).strip(), repr(str(exc))
    else:
        assert isinstance(module, SmoothedTraining) and not module.training
    assert not any((folder / name).exists() for name in live), "a payload ran"
