"""The round profiler: synthetic data of the right structure, per-phase records, JSON and PNG."""
import json

import numpy as np
import pytest

from benchmarks import profile as P


def test_fit_power_law_recovers_exponent(rng):
    n = np.array([500, 1000, 2000, 4000, 8000])
    t = 3e-7 * n**2.5 * np.exp(rng.normal(0, 0.02, n.size))
    a, pref = P.fit_power_law(n, t)
    assert a == pytest.approx(2.5, abs=0.05)
    assert pref * 16000**a == pytest.approx(3e-7 * 16000**2.5, rel=0.15)
    with pytest.raises(ValueError, match="two positive"):
        P.fit_power_law([100, 200], [1.0, 0.0])


def test_synthetic_features_and_scores_structure():
    f, cams, ids = P.synthetic_features(500, 4, seed=1, dim=64)
    assert f.shape == (500, 64) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1, rtol=1e-5)
    assert set(cams.tolist()) == {0, 1, 2, 3}
    same = ids[:, None] == ids[None]
    cos = f @ f.T
    assert cos[same & ~np.eye(500, dtype=bool)].mean() > cos[~same].mean() + 0.3  # identities cluster
    heads = P.heads_from_samples(f, cams, k_intra=30)
    s = P.synthetic_scores(f, cams, heads)
    dims = [h.shape[0] for h in heads]
    assert s.shape == (500, sum(dims))
    blocks = np.split(s, np.cumsum(dims)[:-1], axis=1)
    for b in blocks:  # one softmax a camera, peaked
        np.testing.assert_allclose(b.sum(axis=1), 1, rtol=1e-4)
    assert np.median(np.concatenate([b.max(axis=1) for b in blocks])) > 0.2


def test_parse_scale():
    assert P.parse_scale("msmt17") == ("msmt17", 32621, 15, 1200)
    assert P.parse_scale("600") == ("600", 600, 6, 37)
    with pytest.raises(ValueError, match="--scale"):
        P.parse_scale("imagenet")


def _check_record(rec, out, name, n, sizes):
    data = json.loads((out / f"profile_{name}.json").read_text())
    assert (out / f"profile_{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert [p["name"] for p in data["phases"]] == list(P.PHASES)
    assert data["N"] == n and data["machine"]["cores"] >= 1
    for p in data["phases"]:
        assert p["time_s"] >= 0 and p["peak_mb"] > 0
    assert [m["N"] for m in data["reference"]["measured"]] == sizes
    assert set(data["reference"]["at_target"]) == set(P.COMPARED)
    assert not any(v["extrapolated"] for v in data["reference"]["at_target"].values())
    return data


def test_profile_writes_json_and_png(tmp_path):
    rec = P.profile(240, 6, 15, reference_sizes=[60, 120, 240], out=str(tmp_path), log=lambda *a: None)
    data = _check_record(rec, tmp_path, "240", 240, [60, 120, 240])
    _, cams, _ = P.synthetic_features(240, 6, 0, dim=8)
    counts = np.bincount(cams)
    assert counts.max() < P.K_INTRA  # so every camera gets n_c // 2 clusters, and a head that size
    assert data["D"] == sum(c // 2 for c in counts)
    assert data["totals"]["reference_extrapolated"] is False


def test_profile_extrapolates_and_labels(tmp_path):
    rec = P.profile(200, 3, 12, reference_sizes=[50, 100], out=str(tmp_path), log=lambda *a: None)
    at = rec["reference"]["at_target"]
    assert at["intra"]["extrapolated"] is False
    for phase in ("similarity", "rerank", "merge"):
        if phase in rec["reference"]["fit"]:
            assert at[phase]["extrapolated"] is True
            assert at[phase]["delta_mb"] >= at[phase]["dense_floor_mb"]


def test_profile_cli(tmp_path):
    P.main(["--scale", "300", "--out", str(tmp_path), "--reference-sizes", "100", "300"])
    _check_record(None, tmp_path, "300", 300, [100, 300])
