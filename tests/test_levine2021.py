"""The authors' released checkpoint format (Levine & Feizi 2021): loaded by ssn_exp and certified with DSSN,
the counts equal those the authors' own code computed (tests/data/levine2021_checkpoint), through the library
and through ``python -m ssn_exp.certify``, with both arithmetics."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from helpers import read_csv, read_metrics, run_cli, run_cli_many, write_tiny_cifar10
from ssn_exp.certify import count_predictions, exact_certificate
from ssn_exp.cli.certify import levine2021_folder
from ssn_exp.models import CheckpointError, load_levine2021
from ssn_exp.noises import DSSN


@pytest.fixture(scope="module")
def fixture(levine_checkpoint):
    with np.load(levine_checkpoint / "authors_certificates.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def model(levine_checkpoint):
    return load_levine2021(levine_checkpoint / "model_ckpt.torch")


def test_loader_gives_the_authors_logits(model, fixture):
    assert not model.training
    x = torch.from_numpy(fixture["x_uint8"]).float() / 255
    with torch.no_grad():
        logits = model(x).numpy()
    scale = np.abs(fixture["logits"]).max()
    np.testing.assert_allclose(logits, fixture["logits"], rtol=0, atol=1e-6 * scale)
    np.testing.assert_array_equal(logits.argmax(1), fixture["logits"].argmax(1))


@pytest.mark.slow
@pytest.mark.parametrize("sigma,arithmetic,images", [("0.25", "levine2021", 6), ("0.5", "exact", 2)])
def test_dssn_counts_equal_the_authors_counts(model, fixture, sigma, arithmetic, images):
    """sigma = 0.25 (all six images): lambda < 1/2, the general split formula, where the arithmetics differ most;
    sigma = 0.5 the other branch (two images: L = 441 WRN forward passes each on a CPU). The command-line test
    below runs the other two combinations."""
    x = torch.from_numpy(fixture["x_uint8"][:images]).float() / 255
    noise = DSSN(float(sigma), q=255, dim=3072, seed=0, arithmetic=arithmetic)
    assert noise.levels == int(fixture[f"levels_{sigma}"])
    counts = count_predictions(model, x, noise, noise.levels, 10, noise_batch=512).numpy()
    np.testing.assert_array_equal(counts, fixture[f"counts_{sigma}"][:images])
    pred, k = exact_certificate(counts)
    np.testing.assert_array_equal(pred, fixture[f"pred_{sigma}"][:images])
    np.testing.assert_array_equal(
        (torch.from_numpy(k) / 255.0).numpy(), fixture[f"radius_{sigma}"][:images]
    )  # float32(k/255)


def test_folder_names_of_the_release_are_read():
    assert levine2021_folder("ck/cifar_split_derandomized_0.5/model_ckpt.torch") == {
        "method": "dssn",
        "sigma": 0.5,
        "training": "standard",
    }
    assert levine2021_folder("cifar_uniform_3.25_stabilized/model_ckpt.torch") == {
        "method": "uniform",
        "sigma": 3.25,
        "training": "stability",
    }
    assert levine2021_folder("cifar_split_1.0/model_ckpt.torch")["method"] == "ssn"
    assert levine2021_folder("my_models/model_ckpt.torch") is None


def test_damaged_or_foreign_files_are_refused_in_one_line(levine_checkpoint, tmp_path):
    state = torch.load(levine_checkpoint / "model_ckpt.torch", weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.endswith("fc.weight")}, tmp_path / "missing.torch")
    with pytest.raises(CheckpointError, match="do not fit a WideResNet-40-2.*fc.weight"):
        load_levine2021(tmp_path / "missing.torch")
    torch.save({**state, "model.module.extra.weight": torch.zeros(1)}, tmp_path / "extra.torch")
    with pytest.raises(CheckpointError, match="unexpected weights"):
        load_levine2021(tmp_path / "extra.torch")
    torch.save({"model.module.fc.weight": torch.zeros(1)}, tmp_path / "other.torch")
    with pytest.raises(CheckpointError, match="not a checkpoint in the authors' format"):
        load_levine2021(tmp_path / "other.torch")
    (tmp_path / "junk.torch").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_levine2021(tmp_path / "junk.torch")
    with pytest.raises(ValueError, match="CIFAR-10 WideResNet-40-2 checkpoints only"):
        load_levine2021(levine_checkpoint / "model_ckpt.torch", dataset="imagenet")


@pytest.fixture(scope="module")
def cifar_root(fixture, tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    write_tiny_cifar10(root, test_images=fixture["x_uint8"], test_labels=fixture["pred_0.5"])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("sigma,arithmetic,images", [("0.25", "exact", 6), ("0.5", "levine2021", 3)])
def test_cli_certifies_a_released_checkpoint_with_the_authors_counts(
    levine_checkpoint, fixture, cifar_root, tmp_path, sigma, arithmetic, images
):
    folder = tmp_path / "checkpoints" / f"cifar_split_derandomized_{sigma}"
    folder.mkdir(parents=True)
    ckpt = folder / "model_ckpt.torch"
    shutil.copy(levine_checkpoint / "model_ckpt.torch", ckpt)
    out = tmp_path / "out"
    p = run_cli(
        "ssn_exp.certify", f"ckpt={ckpt}", "data=cifar10", f"data.root={cifar_root}", "data.num_workers=0",
        f"hydra.run.dir={out}", "certify.progress=false", "certify.noise_batch=512", "trainer.enable_progress_bar=false",
        f"certify.max_examples={images}", f"method.arithmetic={arithmetic}",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_csv(out / "certificates.csv")
    assert [int(r["index"]) for r in rows] == list(range(images))
    want = [fixture[f"{key}_{sigma}"][:images] for key in ("counts", "pred", "radius")]
    for r, counts, pred, radius in zip(rows, *want, strict=True):
        got = np.zeros(10, dtype=np.int64)
        for item in r["counts"].split():
            c, v = item.split(":")
            got[int(c)] = int(v)
        np.testing.assert_array_equal(got, counts)
        assert int(r["prediction"]) == pred and int(r["correct"]) == (pred == fixture["pred_0.5"][int(r["index"])])
        assert np.float32(int(r["k"]) / 255) == radius
    m = read_metrics(out)
    assert (m["method"], m["sigma"], m["dataset"], m["ckpt_format"], m["levels"], m["training"], m["arithmetic"]) == (
        "dssn", float(sigma), "cifar10", "levine2021", int(fixture[f"levels_{sigma}"]), "standard", arithmetic,
    )  # fmt: skip


def test_cli_refuses_what_does_not_fit_a_released_checkpoint(levine_checkpoint, cifar_root, tmp_path):
    folder = tmp_path / "cifar_split_derandomized_0.5"
    folder.mkdir()
    shutil.copy(levine_checkpoint / "model_ckpt.torch", folder / "model_ckpt.torch")
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(levine_checkpoint / "model_ckpt.torch", plain / "model_ckpt.torch")
    data = ["data=cifar10", f"data.root={cifar_root}"]
    cases = [
        ([f"ckpt={folder / 'model_ckpt.torch'}", *data, "sigma=0.25"], "trained at sigma=0.5 (its folder says so)"),
        ([f"ckpt={folder / 'model_ckpt.torch'}", *data, "method=uniform"], "is a dssn model (its folder says so)"),
        ([f"ckpt={plain / 'model_ckpt.torch'}", *data], "give method= and sigma="),
        ([f"ckpt={plain / 'model_ckpt.torch'}"], "certify them with data=cifar10"),
        ([f"ckpt={plain / 'model_ckpt.torch'}", *data, "ckpt_format=ssn_exp"], "is not an ssn_exp checkpoint"),
    ]
    cases = [([*args, f"hydra.run.dir={tmp_path / 'x' / str(i)}"], text) for i, (args, text) in enumerate(cases)]
    for (_, text), p in zip(cases, run_cli_many([("ssn_exp.certify", args) for args, _ in cases]), strict=True):
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], p.stderr
    assert not list((tmp_path / "x").glob("*/*"))  # failed runs leave no run directory
