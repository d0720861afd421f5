"""One check of the base classifier's output (:func:`ssn_exp.certify.core.check_logits`), made by every procedure:
a model whose output is not finite floating-point (N, num_classes) logits gets the same one-line error, naming
the test examples where it is about them, under exact, fixed and sequential certification."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssn_exp.certify.core import ModelOutputError, check_logits
from ssn_exp.certify.procedures import Exact, FixedSample
from ssn_exp.certify.procedures_sequential import Sequential
from ssn_exp.cli.messages import is_user_error, one_line
from ssn_exp.lightning.certification import certify_dataset
from ssn_exp.noises import DSSN, Uniform

CLASSES = 3


class _Bad(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        logits = x.flatten(1)[:, :CLASSES].double()
        if self.kind == "wide":
            return torch.cat([logits, logits[:, :1]], dim=1)
        if self.kind == "integer":
            return (10 * logits).long()
        logits[x.flatten(1).mean(dim=1) > 0.5, 1] = float("nan")  # the noisy copies of the white example only
        return logits


PROCEDURES = {  # (procedure, a noise it certifies)
    "exact": (Exact(), DSSN(0.5, q=16, dim=64)),
    "fixed": (FixedSample(n0=4, n=8), Uniform(0.5)),
    "sequential": (Sequential(n0=4, n=64, first_batch=4, max_batch=8), Uniform(0.5)),
}


@pytest.mark.parametrize("kind", ["wide", "integer", "nan"])
def test_a_bad_model_output_is_the_same_one_line_under_every_procedure(tmp_path, kind):
    x = torch.zeros(3, 1, 8, 8)
    x[1] = 1.0  # white: its noisy copies average > 0.5 (the black ones' < 0.5), under both noises
    data = torch.utils.data.TensorDataset(x, torch.zeros(3).long())
    lines = {}
    for name, (procedure, noise) in PROCEDURES.items():
        with pytest.raises(Exception) as info:
            certify_dataset(_Bad(kind), noise, data, tmp_path / name, procedure=procedure, num_classes=CLASSES,
                            progress=False, batch_size=3, noise_batch=16)  # fmt: skip
        assert is_user_error(info.value), (name, info.value)
        lines[name] = one_line(info.value)
    assert len(set(lines.values())) == 1, lines
    want = {"wide": "gives 4 logits per input; expected num_classes=3", "integer": "gives int64 logits",
            "nan": "NaN or infinite logits for test example(s) [1]"}[kind]  # fmt: skip
    assert want in lines["exact"]


@pytest.mark.parametrize(
    "logits, got",
    [
        ([[0.0, 1.0, 2.0]] * 4, "list"),  # not a tensor: its type is named
        (torch.zeros(4), "(4,)"),  # one value per input
        (torch.zeros(4, CLASSES, 1), "(4, 3, 1)"),  # the right rows and classes, one dimension too many
        (torch.zeros(5, CLASSES), "(5, 3)"),  # another number of rows
    ],
)
def test_logits_of_another_shape_or_type_are_named(logits, got):
    with pytest.raises(ModelOutputError) as info:
        check_logits(logits, 4, CLASSES)
    assert str(info.value) == f"the model gives {got} for 4 inputs; expected (4, num_classes=3) logits"
