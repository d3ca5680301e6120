"""The round profiler: synthetic data of the right structure, per-phase records, JSON and PNG."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
    for cameras in (0, -2):  # not silently the default
        with pytest.raises(ValueError, match="--cameras must be at least 1"):
            P.parse_scale("msmt17", cameras)


def _check_record(rec, out, name, n, sizes):
    data = json.loads((out / f"profile_{name}.json").read_text())
    assert (out / f"profile_{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert [p["name"] for p in data["phases"]] == list(P.PHASES)
    assert data["N"] == n and data["machine"]["cores"] == os.cpu_count()
    for p in data["phases"]:
        assert p["time_s"] > 0 and p["peak_mb"] > 0
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
    at, fit = rec["reference"]["at_target"], rec["reference"]["fit"]
    assert at["intra"]["extrapolated"] is False
    assert fit  # every phase's time is positive; a memory growth lost in noise drops that phase
    for phase in ("similarity", "rerank", "merge"):
        if phase in fit:
            assert at[phase]["extrapolated"] is True
            assert at[phase]["delta_mb"] >= at[phase]["dense_floor_mb"] > 0
            f = fit[phase]
            assert at[phase]["time_s"] == pytest.approx(f["time_prefactor"] * 200 ** f["time_exponent"])
        else:  # no figure rather than a made-up one
            assert phase not in at


def test_profile_cli(tmp_path):
    P.main(["--scale", "300", "--out", str(tmp_path), "--reference-sizes", "100", "300"])
    _check_record(None, tmp_path, "300", 300, [100, 300])


@pytest.fixture
def no_profile(monkeypatch):
    """No profile runs: a call to either fails the test."""
    for name in ("profile", "profile_sparse"):
        monkeypatch.setattr(P, name, lambda *a, **k: pytest.fail("a profile ran"))


def _cli_error(argv, capsys):
    """Run main as `python -m benchmarks.profile` does; return its one-line error message."""
    from iics_fast.cli import run

    with pytest.raises(SystemExit) as exc:
        run(lambda: P.main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("argv,message", [
    (["--mode", "sparse", "--fast-scores"], "--fast-scores needs --max-per-block"),
    (["--mode", "sparse", "--fast-scores", "--max-per-block", "8", "--compare-dense"], "drop one of them"),
    (["--mode", "sparse", "--k", "0"], "--k (neighbours a row) must be >= 1, got 0"),
    (["--mode", "sparse", "--eps", "2"], "--eps (score mass a head may drop) must be in [0, 1), got 2.0"),
    (["--mode", "sparse", "--max-per-block", "0"], "--max-per-block must be >= 1"),
    (["--cameras", "-2"], "--cameras must be at least 1, got -2"),
    (["--cameras", "0", "--scale", "600"], "--cameras must be at least 1, got 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--scale", "100", "--k-inter", "0"], "--k-inter must be in 1..N = 100"),
    (["--scale", "1"], "--scale N needs at least 2 images"),
    (["--scale", "100", "--reference-sizes", "4", "100"], "--reference-sizes must each be at least 6"),
    (["--reference-rows", "0"], "--reference-rows must be >= 1"),
    (["--reference-max-gb", "0"], "--reference-max-gb must be > 0"),
    (["--k", "8"], "--k applies to --mode sparse only (--mode dense ignores it): add --mode sparse or drop it"),
    (["--similarity", "rerank", "--eps", "0.01", "--max-per-block", "4", "--heads", "samples", "--fast-scores",
      "--index", "flat", "--compare-dense"],
     "--similarity, --eps, --max-per-block, --heads, --fast-scores, --index, --compare-dense apply to --mode sparse"),
    (["--mode", "sparse", "--reference-rows", "4", "--no-reference"],
     "--reference-rows, --no-reference apply to --mode dense only"),
])
def test_cli_refuses_bad_options_before_any_work(argv, message, tmp_path, capsys, no_profile):
    assert message in _cli_error(argv + ["--out", str(tmp_path)], capsys)


def test_cli_refuses_an_out_that_is_a_file(tmp_path, capsys, no_profile):
    (tmp_path / "f").write_text("")
    for out in ("f", "f/sub"):
        assert "is a file, not a folder" in _cli_error(["--out", str(tmp_path / out)], capsys)


def test_cli_passes_only_the_given_mode_options(tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setattr(P, "profile", lambda *a, **k: calls.setdefault("dense", k))
    monkeypatch.setattr(P, "profile_sparse", lambda *a, **k: calls.setdefault("sparse", (a, k)))
    P.main(["--scale", "300", "--no-reference", "--out", str(tmp_path)])
    assert calls["dense"] == {"seed": 0, "out": str(tmp_path), "reference": False}
    P.main(["--mode", "sparse", "--scale", "300", "--k", "24", "--out", str(tmp_path)])
    assert calls["sparse"] == ((300, 6, 18, "300", 0, str(tmp_path)), {"k": 24})


def test_module_turns_a_later_value_error_into_one_line(tmp_path, capsys, monkeypatch):
    """A ValueError from inside the round, under `python -m benchmarks.profile`'s entry point."""
    import runpy
    import warnings

    from iics_fast import pipeline

    def fail(*a, **k):
        raise ValueError("deep inside")

    monkeypatch.setattr(pipeline, "intra_camera_labels", fail)
    monkeypatch.setattr(sys, "argv", ["profile", "--scale", "300", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the module is already imported
        runpy.run_module("benchmarks.profile", run_name="__main__")
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: deep inside\n"


def test_module_entry_point_reports_one_line(tmp_path):
    """`python -m benchmarks.profile` itself: exit status 2, one line, no traceback, nothing run."""
    (tmp_path / "f").write_text("")
    done = subprocess.run([sys.executable, "-m", "benchmarks.profile", "--out", str(tmp_path / "f")],
                          cwd=Path(P.__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: --out") and done.stderr.count("\n") == 1
