"""Smoke test of ``python -m ssn_exp.bench``: structure of the JSON, no timing targets."""

from __future__ import annotations

import json
import math

import pytest

from ssn_exp import bench

RATIOS = ("dssn_vs_forward", "randomized_vs_forward", "dssn_vs_baseline", "randomized_vs_baseline")


def _positive_finite(x) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


def test_bench_quick_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--models", "digits_cnn", "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "digits_cnn" in printed and "cert/fwd" in printed
    result = json.loads(out.read_text())
    for key in (*RATIOS, "train_noise_overhead", "raw", "device", "torch", "threads"):
        assert key in result, key
    for key in RATIOS:
        assert set(result[key]) == {"digits_cnn"}
        assert _positive_finite(result[key]["digits_cnn"]), (key, result[key])
    overhead = result["train_noise_overhead"]["digits_cnn"]
    assert set(overhead) == {"uniform", "ssn", "dssn"}
    assert all(math.isfinite(v) and v >= 0 for v in overhead.values())
    raw = result["raw"]["digits_cnn"]["certification"]
    for method in ("dssn", "randomized"):
        pps = raw[method]["passes_per_second"]
        assert set(pps) == {"cert", "forward", "baseline"}
        assert all(_positive_finite(v) for v in pps.values())
    assert raw["dssn"]["levels"] == 27 and raw["dssn"]["forward_passes"] == 27 * raw["dssn"]["images"]
    assert result["threads"] >= 1 and result["torch"]


def test_bench_rejects_unknown_model():
    with pytest.raises(SystemExit, match="unknown model"):
        bench.main(["--quick", "--models", "nope", "--device", "cpu"])
