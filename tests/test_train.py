"""The trainer end to end on a tiny synthetic camera network: artifacts, resume after a kill,
the errors raised before any training, pseudo-label metrics and the extract CLI."""
import json
import os

import numpy as np
import pytest
import torch

from iics_fast import train
from iics_fast.trainer import (PHASES, adjusted_rand_index, batch_hard_triplet,
                               normalized_mutual_info)

TINY = ["--dataset", "synthetic", "--dataset-options",
        json.dumps({"num_ids": 8, "num_test_ids": 4, "num_cameras": 2, "images_per_camera": [2, 3],
                    "num_distractors": 4, "seed": 3, "image_format": "png"}),
        "--arch", "resnet18", "--height", "32", "--width", "16", "--rounds", "2",
        "--eval-every", "1", "--k-intra", "6", "--k-inter", "8", "--batch-per-camera", "4",
        "--batch-p", "4", "--batch-k", "2", "--epochs-intra", "1", "--epochs-inter", "1",
        "--batch-extract", "32", "--seed", "5", "--threads", "1", "--no-progress",
        "--no-verbose"]


class Killed(RuntimeError):
    pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    old = os.environ.get("IICS_FAST_CACHE")
    os.environ["IICS_FAST_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("IICS_FAST_CACHE")
    else:
        os.environ["IICS_FAST_CACHE"] = old


@pytest.fixture(scope="module")
def full_run(cache, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full") / "run")
    metrics = train.main(TINY + ["--out", out])
    return out, metrics


def _strip_times(rows):
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]


def test_run_writes_config_metrics_checkpoints_and_plots(full_run, capsys):
    out, metrics = full_run
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["rounds"] == 2 and config["k_inter"] == 8 and config["arch"] == "resnet18"
    assert config["lr_intra"] == train.PRESETS["synthetic"]["lr_intra"]  # preset applied
    assert config["mu"] == 0.02 and config["margin"] == 0.3  # paper defaults kept
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rows) == 2 and _strip_times(rows) == json.loads(json.dumps(_strip_times(metrics)))
    for r, row in enumerate(rows):
        assert row["round"] == r
        assert set(row["time"]) == set(PHASES)
        assert len(row["intra_clusters"]) == 2 and row["inter_clusters"] == 8
        assert row["stage1"]["iterations"] > 0 and np.isfinite(row["stage1"]["loss"])
        assert np.isfinite(row["stage2"]["loss_ce"]) and np.isfinite(row["stage2"]["loss_triplet"])
        for key in ("intra_quality", "inter_quality"):
            assert -1 <= row[key]["ari"] <= 1 and 0 <= row[key]["nmi"] <= 1
        assert 0 <= row["eval"]["mAP"] <= 1 and row["eval"]["rank1"] <= row["eval"]["rank10"]
    assert rows[1]["mu"] < rows[0]["mu"] == pytest.approx(0.02)

    from iics_fast import models
    for name in ("last.pt", "best.pt"):
        state = torch.load(os.path.join(out, name), map_location="cpu", weights_only=False)
        assert state["config"] == config
        model = models.build_backbone("resnet18")
        model.load_state_dict(state["model"])
    last = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=False)
    assert last["progress"] == {"round": 1, "done": "round"}
    assert len(last["inter_labels"]) == len(last["intra_labels"])
    for plot in ("metrics.png", "similarity.png"):
        assert os.path.getsize(os.path.join(out, plot)) > 1000


def test_resume_after_a_kill_matches_the_uninterrupted_run(full_run, tmp_path):
    out_full, metrics_full = full_run
    out = str(tmp_path / "run")

    def kill_after_first_stage1(event, r):
        if (event, r) == ("stage1", 0):
            raise Killed

    with pytest.raises(Killed):
        train.main(TINY + ["--out", out], hook=kill_after_first_stage1)
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))  # killed inside round 1
    metrics = train.main(["--resume", "--out", out, "--no-progress", "--no-verbose"])
    assert _strip_times(metrics) == _strip_times(metrics_full)
    a = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=False)
    b = torch.load(os.path.join(out_full, "last.pt"), map_location="cpu", weights_only=False)
    np.testing.assert_array_equal(a["inter_labels"], b["inter_labels"])
    np.testing.assert_array_equal(a["intra_labels"], b["intra_labels"])
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=0, atol=0)


def test_intra_only_ablation_runs(cache, tmp_path):
    metrics = train.main(TINY + ["--out", str(tmp_path / "run"), "--stages", "intra",
                                 "--rounds", "1"])
    assert "stage2" not in metrics[0] and "eval" in metrics[0]


def test_rerank_threshold_and_jaccard_paths_run(cache, tmp_path):
    metrics = train.main(TINY + ["--out", str(tmp_path / "run"), "--rounds", "1",
                                 "--similarity", "rerank", "--inter-similarity", "jaccard",
                                 "--threshold-intra", "0.05", "--threshold-inter", "0.05",
                                 "--k-intra", "1", "--k-inter", "1"])
    row = metrics[0]
    # a low distance quantile as threshold: many small clusters, more than the counts asked
    assert sum(row["intra_clusters"]) > 2 and row["inter_clusters"] > 4
    assert np.isfinite(row["stage2"]["loss_ce"])


def _error(argv, match):
    with pytest.raises(ValueError, match=match):
        train.main(TINY + argv)


def test_errors_before_training(cache, tmp_path):
    out = str(tmp_path / "run")
    _error(["--out", out, "--resume"], "no checkpoint")
    _error(["--out", out, "--batch-per-camera", "50"], r"camera \d has \d+ training images")
    _error(["--out", out, "--k-inter", "100000"], "more clusters than the")
    _error(["--out", out, "--dataset", "market1501", "--root", str(tmp_path / "missing"),
            "--dataset-options", "{}"], "missing|not|no ")
    bad = tmp_path / "r18.pth"
    from iics_fast import models
    torch.save(models.build_backbone("resnet18").state_dict(), bad)
    _error(["--out", out, "--arch", "resnet50", "--pretrained", str(bad)], "resnet18 weights")
    _error(["--out", out, "--pretrained", str(tmp_path / "nope.pth")], "not a file")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"k_inter": 8, "no_such_key": 1}))
    _error(["--out", out, "--config", str(cfg)], "unknown keys")
    assert not os.path.exists(os.path.join(out, "last.pt"))
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "config.json"), "w").write("{}")
    _error(["--out", out], "holds another run")


def test_config_file_and_command_line_precedence(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('dataset = "msmt17"\nk-inter = 999\nrounds = 3\n')
    args = train.parse_args(["--config", str(cfg), "--rounds", "7"])
    config = train.resolve(args)
    assert config["epochs_intra"] == 12  # the msmt17 preset
    assert config["k_inter"] == 999  # the file over the preset
    assert config["rounds"] == 7  # the command line over the file
    assert config["arch"] == "resnet50" and config["device"] in ("cpu", "cuda")


def test_extract_cli(full_run, tmp_path, capsys):
    from iics_fast import extract
    out, _ = full_run
    from iics_fast import datasets
    images = sorted({os.path.dirname(p) for p, _, _ in datasets.build(
        "synthetic", None, **json.loads(TINY[3])).gallery})[0]
    feats = str(tmp_path / "g.npy")
    extract.main(["features", os.path.join(out, "best.pt"), images, "--save", feats])
    f = np.load(feats)
    names = open(str(tmp_path / "g.txt")).read().split()
    assert f.shape == (len(names), 512)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, rtol=1e-5)
    capsys.readouterr()
    extract.main(["rank", os.path.join(out, "best.pt"), names[0], feats, "--top-k", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[1].split()[2] == names[0]  # the query finds itself first
    assert float(lines[1].split()[1]) == pytest.approx(0.0, abs=1e-5)


def test_pseudo_label_metrics_match_sklearn(rng):
    metrics = pytest.importorskip("sklearn.metrics")
    for _ in range(5):
        a = rng.integers(0, 7, size=200)
        b = np.where(rng.random(200) < 0.7, a, rng.integers(0, 9, size=200)) * 3 + 1
        assert adjusted_rand_index(a, b) == pytest.approx(metrics.adjusted_rand_score(a, b))
        assert normalized_mutual_info(a, b) == pytest.approx(
            metrics.normalized_mutual_info_score(a, b))
    assert adjusted_rand_index(a, a) == pytest.approx(1.0)


def test_batch_hard_triplet_against_a_loop(rng):
    x = torch.from_numpy(rng.normal(size=(12, 5)).astype(np.float32))
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 0])
    d = torch.cdist(x, x)
    expect = []
    for i in range(12):
        pos = max(d[i, j] for j in range(12) if y[j] == y[i])
        neg = min(d[i, j] for j in range(12) if y[j] != y[i])
        expect.append(max(0.0, float(pos - neg) + 0.3))
    assert float(batch_hard_triplet(x, y, 0.3)) == pytest.approx(np.mean(expect), rel=1e-4)
