"""A user's own components: one YAML file on hydra.searchpath, no code change (and one-line errors when wrong)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import certificate_columns, read_csv, read_metrics, run_cli, run_cli_many

USER_MLP = """\
_target_: torch.nn.Sequential
_args_:
  - _target_: torch.nn.Flatten
  - _target_: torch.nn.Linear
    in_features: {in_features}
    out_features: {out_features}
"""


def _conf(tmp_path: Path, files: dict[str, str]) -> str:
    root = tmp_path / "my_conf"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return f"hydra.searchpath=[file://{root}]"


@pytest.mark.slow
def test_a_user_model_trains_certifies_and_recertifies_from_its_checkpoint(tmp_path):
    search = _conf(tmp_path, {"model/user_mlp.yaml": USER_MLP.format(in_features=64, out_features=10)})
    run = tmp_path / "run"
    p = run_cli("ssn_exp", "model=user_mlp", search, "debug=fast", "method=dssn", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-3000:]
    m = read_metrics(run)
    assert (m["model"], m["n_examples"]) == ("torch.nn.Sequential", 8)
    # certify the checkpoint in a fresh process without the user's config folder: the model comes from the checkpoint,
    # built because the user trusts its module (a checkpoint is data: tests/test_trust.py)
    out = tmp_path / "recert"
    ckpt = run / "checkpoints" / "last.ckpt"
    p = run_cli(
        "ssn_exp.certify", f"ckpt={ckpt}", f"hydra.run.dir={out}", "certify.max_examples=8", "trust_targets=[torch.nn]"
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert certificate_columns(read_csv(out / "certificates.csv")) == certificate_columns(
        read_csv(run / "certificates.csv")
    )


def _one_error_line(p) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    return lines[0]


WRONG_MODELS = [
    ("_target_: nope.Nothing\n", ["cannot build model from", "bad0.yaml", "Error locating target 'nope.Nothing'"]),
    (
        "_target_: torch.nn.Linear\nin_features: 64\nout_features: 10\nfoo: 1\n",
        ["cannot build model from", "bad1.yaml", "unexpected keyword argument 'foo'"],
    ),
    (USER_MLP.format(in_features=64, out_features=7), ["bad2.yaml", "gives 7 logits per input", "num_classes=10"]),
    (USER_MLP.format(in_features=63, out_features=10), ["bad3.yaml", "does not accept digits images", "[1, 8, 8]"]),
    ("in_features: 64\n", ["bad4.yaml has no _target_"]),
]


def test_a_wrong_user_model_is_one_line_naming_its_file(tmp_path):
    search = _conf(tmp_path, {f"model/bad{i}.yaml": yaml for i, (yaml, _) in enumerate(WRONG_MODELS)})
    calls = [
        ("ssn_exp", [f"model=bad{i}", search, "debug=fast", f"hydra.run.dir={tmp_path / str(i) / 'run'}"])
        for i in range(len(WRONG_MODELS))
    ]
    for i, ((_, words), p) in enumerate(zip(WRONG_MODELS, run_cli_many(calls), strict=True)):
        line = _one_error_line(p)
        for word in words:
            assert word in line, line
        assert not (tmp_path / str(i) / "run").exists()


def test_a_built_in_model_on_the_wrong_data_is_refused_before_training(tmp_path):
    p = run_cli("ssn_exp", "model=resnet50", "debug=fast", f"hydra.run.dir={tmp_path / 'run'}")
    line = _one_error_line(p)
    assert "resnet50.yaml does not accept digits images of shape [1, 8, 8]" in line and "3 channels" in line


@pytest.mark.slow
def test_a_user_noise_config_is_one_yaml_file(tmp_path):
    search = _conf(
        tmp_path,
        {
            "method/authors_dssn.yaml": (
                "_target_: ssn_exp.noises.DSSN\nsigma: ${sigma}\nq: ${data.q}\ndim: ${numel:${data.shape}}\n"
                "seed: ${seed}\narithmetic: levine2021\n"
            )
        },
    )
    run = tmp_path / "run"
    p = run_cli("ssn_exp", "method=authors_dssn", search, "debug=fast", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-3000:]
    m = read_metrics(run)
    assert (m["method"], m["arithmetic"], m["levels"]) == ("dssn", "levine2021", 27)
