"""Layer 2 without subprocesses: the stability loss, sharded and resumed certification, the checks on result
files read back, and the crash-safe CSV log."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from helpers import cert_rows, read_csv
from ssn_exp.lightning.certification import certify_indices, open_certifier, shard_indices
from ssn_exp.lightning.loggers import RunCSVLogger
from ssn_exp.lightning.module import SmoothedTraining
from ssn_exp.lightning.objectives import stability_loss
from ssn_exp.lightning.results import ResultsFileError, merge_shards, read_certificates
from ssn_exp.noises import DSSN, SSN


def _data(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 17, (n, 1, 8, 8), generator=g).float() / 16
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(x, y)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()


def _certifier(out, noise, ds=None, model=None, **kw):
    kw = {"num_classes": 10, "n0": 8, "n": 64, "noise_batch": 50, "batch_size": 4, **kw}
    return open_certifier(model or _model(), noise, ds or _data(), out, **kw)


def _record(noise):
    from ssn_exp.certify.procedures import default_procedure
    from ssn_exp.certify.record import CertificateRecord

    return CertificateRecord(noise, default_procedure(noise, n0=8, n=64))


# ----------------------------------------------------------------------------- stability training


def test_stability_loss_is_ce_plus_weight_times_kl_of_the_first_sample_against_the_second():
    g = torch.Generator().manual_seed(0)
    logits, logits2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0])
    p, q = logits.softmax(1), logits2.softmax(1)
    kl = (p * (p.log() - q.log())).sum(1).mean()  # KL(softmax f(x1) || softmax f(x2)), batch mean
    ce = -logits.log_softmax(1)[torch.arange(5), y].mean()
    loss, got_kl = stability_loss(logits, logits2, y, 6.0)
    torch.testing.assert_close(got_kl, kl)
    torch.testing.assert_close(loss, ce + 6.0 * kl)
    reverse = (q * (q.log() - p.log())).sum(1).mean()
    assert abs(float(got_kl - reverse)) > 1e-3  # the direction matters for these logits


def test_a_stability_training_step_uses_the_configured_weight_six():
    from hydra import compose, initialize_config_dir

    from ssn_exp.cli.config import CONF_DIR, container

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["training=stability", "method=ssn"])
    assert cfg.training.stability_weight == 6.0
    module = SmoothedTraining(
        model=container(cfg.model),
        method=container(cfg.method),
        data=container(cfg.data),
        training="stability",
        stability_weight=float(cfg.training.stability_weight),
        seed=3,
    )
    x, y = _data(6)[:]
    loss = module.training_step((x, y), 0)
    # the same step by hand: the noise of step 0 (the module's own generator), then CE + 6 KL
    noisy = module.smoothing.sample(torch.cat([x, x]), module._generator(1, 0, 0))  # stream 1, epoch 0, batch 0
    logits, logits2 = module(noisy).chunk(2)
    p, q = F.softmax(logits, 1), F.softmax(logits2, 1)
    want = F.cross_entropy(logits, y) + 6.0 * (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(loss, want)


# ----------------------------------------------------------------------------- sharding and resume


@pytest.mark.parametrize("noise", [DSSN(0.5, q=16, dim=64), SSN(0.5)], ids=["dssn", "ssn"])
def test_sharded_certification_merges_to_the_single_process_result(tmp_path, noise):
    single = tmp_path / "single"
    _certifier(single, noise, skip=2, max_examples=11).run("cpu", progress=False)
    sharded = tmp_path / "sharded"
    for rank in range(3):
        _certifier(sharded, noise, skip=2, max_examples=11, rank=rank, world_size=3).run("cpu", progress=False)
    merge_shards(sharded, 3, _record(noise))
    assert not list(sharded.glob("certificates.rank*.csv"))
    rows = cert_rows(sharded / "certificates.csv")
    assert [int(r["index"]) for r in rows] == list(range(0, 22, 2))
    assert rows == cert_rows(single / "certificates.csv")


def test_concurrent_ranks_check_the_directory_before_any_rank_writes_to_it(tmp_path):
    # rank 1 starts first; without the barrier it writes its shard file before rank 0 has written
    # certify_settings.json, and rank 0 then refuses "certificates but no certify_settings.json" (seen in CI)
    noise = DSSN(0.5, q=16, dim=64)
    sync = threading.Barrier(2, timeout=60)
    errors, order = [], []

    def barrier(name):
        order.append(name)
        sync.wait()

    def start(rank):
        try:
            _certifier(tmp_path, noise, rank=rank, world_size=2, barrier=barrier).run("cpu", progress=False)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            sync.abort()

    first = threading.Thread(target=start, args=(1,))
    first.start()
    first.join(timeout=1.0)  # rank 1 is waiting at the barrier (or, without one, has written its shard)
    second = threading.Thread(target=start, args=(0,))
    second.start()
    for t in (first, second):
        t.join(timeout=60)
    assert not errors, errors
    assert sorted(set(order)) == ["certify settings checked", "certify settings written"]
    merge_shards(tmp_path, 2, _record(noise))
    assert [int(r["index"]) for r in cert_rows(tmp_path / "certificates.csv")] == list(range(23))


def test_a_resume_with_another_number_of_ranks_keeps_every_row(tmp_path):
    noise = DSSN(0.5, q=16, dim=64)
    single = tmp_path / "single"
    _certifier(single, noise).run("cpu", progress=False)
    out = tmp_path / "out"
    for rank in range(3):  # three ranks certify half of their shards, then the job dies
        c = _certifier(out, noise, rank=rank, world_size=3)
        for chunk in c.chunks()[:1]:
            c.run_chunk(chunk, torch.device("cpu"))
    before = sum(len(read_certificates(p)) for p in out.glob("certificates.rank*.csv"))
    assert 0 < before < 23
    todo = []
    for rank in range(2):  # resumed with two ranks
        c = _certifier(out, noise, rank=rank, world_size=2)
        todo += c.todo
        c.run("cpu", progress=False)
    assert len(todo) == 23 - before  # nothing certified twice, nothing lost
    merge_shards(out, 2, _record(noise))
    assert not list(out.glob("certificates.rank*.csv"))
    assert cert_rows(out / "certificates.csv") == cert_rows(single / "certificates.csv")


def test_a_stale_metrics_file_goes_when_certificates_are_added(tmp_path):
    noise = DSSN(0.5, q=16, dim=64)
    _certifier(tmp_path, noise, max_examples=5).run("cpu", progress=False)
    (tmp_path / "metrics.json").write_text("{}")
    _certifier(tmp_path, noise, max_examples=5)  # complete: kept
    assert (tmp_path / "metrics.json").is_file()
    _certifier(tmp_path, noise, max_examples=9)  # more examples to certify: the old summary is no longer true
    assert not (tmp_path / "metrics.json").exists()


def test_merging_refuses_a_missing_shard(tmp_path):
    noise = DSSN(0.5, q=16, dim=64)
    for rank in (0, 1):
        _certifier(tmp_path, noise, rank=rank, world_size=3).run("cpu", progress=False)
    with pytest.raises(ResultsFileError, match="certificates.rank2.csv is missing"):
        merge_shards(tmp_path, 3, _record(noise))


def test_shards_split_the_selection_without_padding():
    sel = certify_indices(50, skip=3, max_examples=10)
    assert sel == list(range(0, 30, 3))
    parts = [shard_indices(sel, r, 4) for r in range(4)]
    assert sorted(i for p in parts for i in p) == sel and [len(p) for p in parts] == [3, 3, 2, 2]


def test_resume_certifies_exactly_the_missing_examples(tmp_path):
    noise = SSN(0.5)
    full = tmp_path / "full"
    _certifier(full, noise).run("cpu", progress=False)
    part = tmp_path / "part"
    part.mkdir()
    lines = (full / "certificates.csv").read_text().splitlines(keepends=True)
    (part / "certificates.csv").write_text("".join(lines[:8]) + lines[8][:17])  # 7 rows and a torn 8th
    (part / "certify_settings.json").write_text((full / "certify_settings.json").read_text())
    c = _certifier(part, noise)
    assert c.todo == list(range(7, 23))
    c.run("cpu", progress=False)
    assert cert_rows(part / "certificates.csv") == cert_rows(full / "certificates.csv")


def _tamper(tmp_path, noise, edit):
    out = tmp_path / "run"
    _certifier(out, noise).run("cpu", progress=False)
    path = out / "certificates.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(edit(lines)))
    return out


def _bump(line, column, header):
    value = line.rstrip("\n").split(",")[header.index(column)]
    return _change(line, column, str(int(value) + 1), header)


def _change(line, column, value, header):
    cells = line.rstrip("\n").split(",")
    cells[header.index(column)] = value
    return ",".join(cells) + "\n"


@pytest.mark.parametrize(
    "noise,edit,message",
    [
        (DSSN(0.5, q=16, dim=64), lambda ls: ls + [ls[3]], "a second row for example 2"),
        (
            DSSN(0.5, q=16, dim=64),
            lambda ls: ls + [_change(ls[1], "index", "99", ls[0].strip().split(","))],
            "example 99 is not one this certification selects",
        ),
        (
            SSN(0.5),
            lambda ls: (
                [ls[0], _change(ls[1], "label", str((int(ls[1].split(",")[1]) + 1) % 10), ls[0].strip().split(","))]
                + ls[2:]
            ),
            "the data set's label",
        ),
        (DSSN(0.5, q=16, dim=64), lambda ls: ls[:3] + ["garbage,row\n"] + ls[3:], "line 4: malformed"),
        (
            DSSN(0.5, q=16, dim=64),
            lambda ls: [ls[0], _bump(ls[1], "k", ls[0].strip().split(","))] + ls[2:],
            "do not follow from the counts",
        ),
        (
            SSN(0.5),
            lambda ls: [ls[0], _change(ls[1], "p_lower", "0.999", ls[0].strip().split(","))] + ls[2:],
            "p_lower and radius disagree",
        ),
        (  # p_lower and radius changed together, consistently: the counts still give them away
            SSN(0.5),
            lambda ls: (
                [
                    ls[0],
                    _change(
                        _change(ls[1], "p_lower", "0.75", ls[0].strip().split(",")),
                        "radius",
                        repr(2 * SSN(0.5).lam * 0.25),
                        ls[0].strip().split(","),
                    ),
                ]
                + ls[2:]
            ),
            "p_lower does not follow from the counts",
        ),
        (
            SSN(0.5),
            lambda ls: (
                [ls[0], _change(ls[1], "correct", "1" if ",0," in ls[1][:20] else "0", ls[0].strip().split(","))]
                + ls[2:]
            ),
            "disagree",
        ),
    ],
)
def test_rows_read_back_on_resume_are_checked(tmp_path, noise, edit, message):
    out = _tamper(tmp_path, noise, edit)
    with pytest.raises(ResultsFileError, match=message) as info:
        _certifier(out, noise)
    assert str(out / "certificates.csv") in str(info.value) and "\n" not in str(info.value)


def test_certificates_of_other_weights_or_settings_are_not_mixed(tmp_path):
    noise = SSN(0.5)
    _certifier(tmp_path, noise).run("cpu", progress=False)
    other = _model()
    with torch.no_grad():
        other[1].bias.add_(1.0)
    with pytest.raises(ResultsFileError, match="other settings.*weights"):
        _certifier(tmp_path, noise, model=other)
    with pytest.raises(ResultsFileError, match="other settings.*n: 64 -> 128"):
        _certifier(tmp_path, noise, n=128)
    with pytest.raises(ResultsFileError, match="other settings.*autocast: None -> 'bf16'"):
        _certifier(tmp_path, noise, autocast="bf16")
    with pytest.raises(ResultsFileError, match="other settings.*precision: None -> 'bf16-mixed'"):
        _certifier(tmp_path, noise, precision="bf16-mixed")
    settings = json.loads((tmp_path / "certify_settings.json").read_text())
    assert settings["n"] == 64 and settings["method"] == "ssn" and len(settings["weights"]) == 16
    (tmp_path / "certify_settings.json").unlink()
    with pytest.raises(ResultsFileError, match="no certify_settings.json"):
        _certifier(tmp_path, noise)


def test_the_entry_points_check_before_writing_is_the_certifier_s_own(tmp_path):
    """Issue 23 §5: the entry points refuse other certify settings before anything is written
    (:func:`refuse_other_certificates`): with the settings the certifier recorded it passes (or every rerun of a
    finished run would be refused), other ones are refused in its words, weights not yet known are not compared, and
    nothing in the folder changes."""
    from dataclasses import replace

    from helpers import tree
    from ssn_exp.certify.procedures import default_procedure
    from ssn_exp.cli.common import refuse_other_certificates
    from ssn_exp.lightning.certification import CertifyRun
    from ssn_exp.lightning.results import model_fingerprint

    noise = SSN(0.5)
    _certifier(tmp_path, noise, seed=3).run("cpu", progress=False)
    before = tree(tmp_path)
    settings = CertifyRun(seed=3)
    weights = model_fingerprint(_model())
    refuse_other_certificates(tmp_path, weights, noise, default_procedure(noise, n0=8, n=64), settings)
    refuse_other_certificates(tmp_path, None, noise, default_procedure(noise, n0=8, n=64), settings)
    with pytest.raises(ResultsFileError, match=r"other settings \(n: 64 -> 128\)"):
        refuse_other_certificates(tmp_path, None, noise, default_procedure(noise, n0=8, n=128), settings)
    with pytest.raises(ResultsFileError, match=r"other settings \(weights: '[0-9a-f]{16}' -> 'other'\)"):
        refuse_other_certificates(tmp_path, "other", noise, default_procedure(noise, n0=8, n=64), settings)
    with pytest.raises(ResultsFileError, match=r"other settings \(seed: 3 -> 4; autocast: None -> 'bf16'\)"):
        refuse_other_certificates(
            tmp_path, weights, noise, default_procedure(noise, n0=8, n=64), replace(settings, seed=4, autocast="bf16")
        )
    assert tree(tmp_path) == before


def test_unchecked_reading_still_tolerates_a_torn_last_line(tmp_path):
    (tmp_path / "c.csv").write_text("index,label\n0,1\n1,")
    assert list(read_certificates(tmp_path / "c.csv")) == [0]


# ----------------------------------------------------------------------------- the CSV training log


def test_csv_log_keeps_rows_on_restart_and_drops_the_epochs_being_redone(tmp_path):
    log = RunCSVLogger(tmp_path, name="csv")
    for epoch in range(4):
        log.log_metrics({"train/loss": 1.0 / (epoch + 1), "epoch": epoch}, step=10 * (epoch + 1))
    log.log_metrics({"val/acc": 0.5, "epoch": 3}, step=40)  # a new column: the file is rewritten, rows kept
    path = tmp_path / "csv" / "metrics.csv"
    path.write_text(path.read_text() + "4,0.2,5")  # a torn row of a killed epoch
    again = RunCSVLogger(tmp_path, name="csv")  # the resumed process
    again.truncate_from_epoch(3)
    rows = read_csv(path)
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    again.log_metrics({"train/loss": 0.25, "epoch": 3}, step=40)
    rows = read_csv(path)
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"] and set(rows[0]) >= {"val/acc", "train/loss", "step"}
    assert float(rows[1]["train/loss"]) == 0.5


def test_noise_of_a_training_step_depends_only_on_seed_step_and_rank():
    from hydra import compose, initialize_config_dir

    from ssn_exp.cli.config import CONF_DIR, container

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=uniform"])
    kw = dict(model=container(cfg.model), method=container(cfg.method), data=container(cfg.data))
    a, b = SmoothedTraining(**kw, seed=1), SmoothedTraining(**kw, seed=1)
    x = torch.full((4, 1, 8, 8), 0.5)
    torch.manual_seed(123)  # the global RNG does not matter
    na = a.smoothing.sample(x, a._generator(1, 3, 7))  # epoch 3, batch 7
    torch.manual_seed(456)
    nb = b.smoothing.sample(x, b._generator(1, 3, 7))
    assert torch.equal(na, nb)
    assert not torch.equal(na, a.smoothing.sample(x, a._generator(1, 3, 8)))
    assert not torch.equal(na, a.smoothing.sample(x, a._generator(1, 4, 7)))
    c = SmoothedTraining(**kw, seed=2)
    assert not torch.equal(na, c.smoothing.sample(x, c._generator(1, 3, 7)))


# ----------------------------------------------------------------------------- certification split over jobs


def _job_merge(out, noise, n_shards, ds=None, **sel):
    from ssn_exp.lightning.certification import merge_job_shards

    ds = ds or _data()
    selected = certify_indices(len(ds), sel.get("skip", 1), sel.get("max_examples"))
    check = dict(labels=lambda idx: [int(ds[i][1]) for i in idx], num_classes=10)
    return merge_job_shards(out, _record(noise), n_shards, selected, check)


@pytest.mark.parametrize("noise", [DSSN(0.5, q=16, dim=64), SSN(0.5)], ids=["dssn", "ssn"])
def test_job_shards_merge_to_the_single_job_result_and_wait_for_the_missing_ones(tmp_path, noise):
    from ssn_exp.lightning.certification import ShardsPending

    single = tmp_path / "single"
    _certifier(single, noise, skip=2).run("cpu", progress=False)
    out = tmp_path / "sharded"
    _certifier(out, noise, skip=2, shard=2, num_shards=3).run("cpu", progress=False)
    for rank in range(2):  # job shard 0 runs on two DDP ranks: global shard = job shard x rank
        _certifier(out, noise, skip=2, shard=0, num_shards=3, rank=rank, world_size=2).run("cpu", progress=False)
    merge_shards(out, 2, _record(noise), stem="certificates.shard0of3")
    with pytest.raises(ShardsPending) as pending:  # shard 1 has not run: nothing is merged
        _job_merge(out, noise, 3, skip=2)
    assert pending.value.missing == [1] and not (out / "certificates.csv").exists()
    _certifier(out, noise, skip=2, shard=1, num_shards=3).run("cpu", progress=False)
    _job_merge(out, noise, 3, skip=2)
    assert sorted(p.name for p in out.glob("certificates*.csv")) == ["certificates.csv"]
    assert cert_rows(out / "certificates.csv") == cert_rows(single / "certificates.csv")
    _job_merge(out, noise, 3, skip=2)  # merging again (a requeued last shard) changes nothing
    assert cert_rows(out / "certificates.csv") == cert_rows(single / "certificates.csv")
    again = _certifier(out, noise, skip=2, shard=1, num_shards=3)  # a shard rerun after the merge: nothing to do
    assert again.todo == [] and not list(out.glob("certificates.shard*"))


def test_a_killed_job_shard_resumes_where_it_stopped(tmp_path):
    noise = SSN(0.5)
    single = tmp_path / "single"
    _certifier(single, noise).run("cpu", progress=False)
    out = tmp_path / "out"
    c = _certifier(out, noise, shard=1, num_shards=2)
    c.run_chunk(c.chunks()[0], torch.device("cpu"))  # then the job dies
    c = _certifier(out, noise, shard=1, num_shards=2)
    assert c.todo == list(range(1, 23, 2))[4:]
    c.run("cpu", progress=False)
    _certifier(out, noise, shard=0, num_shards=2).run("cpu", progress=False)
    _job_merge(out, noise, 2)
    assert cert_rows(out / "certificates.csv") == cert_rows(single / "certificates.csv")


def test_the_merge_refuses_a_shard_of_another_split_and_rows_outside_a_shard(tmp_path):
    noise = DSSN(0.5, q=16, dim=64)
    for j in range(3):
        _certifier(tmp_path, noise, shard=j, num_shards=3).run("cpu", progress=False)
    (tmp_path / "certificates.shard0of3.csv").rename(tmp_path / "certificates.shard0of4.csv")
    with pytest.raises(ResultsFileError, match=r"shard0of4.csv is not a shard of this certification"):
        _job_merge(tmp_path, noise, 3)
    # shard 1's rows under shard 0's name: a duplicated shard (shard 0's examples are missing)
    (tmp_path / "certificates.shard0of4.csv").unlink()
    (tmp_path / "certificates.shard0of3.csv").write_text((tmp_path / "certificates.shard1of3.csv").read_text())
    with pytest.raises(ResultsFileError, match=r"shard0of3.csv line 2: example 1 is not one this certification"):
        _job_merge(tmp_path, noise, 3)
    assert not (tmp_path / "certificates.csv").exists()


def test_a_job_shard_with_other_settings_is_refused_before_it_writes(tmp_path):
    noise = DSSN(0.5, q=16, dim=64)
    _certifier(tmp_path, noise, shard=0, num_shards=2).run("cpu", progress=False)
    (tmp_path / "certificates.shard0of2.csv").unlink()  # even with no certificate written yet: the first job's
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()  # settings fix the directory
    with pytest.raises(ResultsFileError, match="certificates made with other settings .*weights"):
        _certifier(tmp_path, noise, shard=1, num_shards=2, model=other)
    assert not list(tmp_path.glob("certificates*.csv"))
