"""The round's clustering steps (iics_fast.pipeline): the per-camera count rule, the intra- and
inter-camera labels against SciPy, and one pipeline for the trainer and the profiler alike."""
import json

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from benchmarks import profile as P
from iics_fast import pipeline, train

#: the default re-ranking parameters, as the trainer passes them
RERANK = {"k1": train.DEFAULTS["rerank_k1"][0], "k2": train.DEFAULTS["rerank_k2"][0],
          "lambda_value": train.DEFAULTS["rerank_lambda"][0]}


def _same_partition(a, b):
    pairs = set(zip(np.asarray(a).tolist(), np.asarray(b).tolist()))
    return len(pairs) == len(set(np.asarray(a).tolist())) == len(set(np.asarray(b).tolist()))


def test_cluster_count():
    assert [pipeline.cluster_count(n, 600) for n in (600, 601, 599, 3, 1)] == [600, 600, 299, 1, 1]
    assert pipeline.cluster_count(10, 4) == 4


def test_intra_camera_labels_against_scipy(rng):
    """Per camera, 1 - cos and average linkage into cluster_count(n_c, k) clusters: cameras of
    one image, of fewer images than k, unsorted camera ids, a camera id gap."""
    camids = rng.permutation(np.r_[np.zeros(40, int), np.full(7, 3), [5], np.full(25, 2)])
    feats = torch.from_numpy(rng.standard_normal((len(camids), 16)).astype(np.float32))
    labels = pipeline.intra_camera_labels(feats, camids, 10)
    x = torch.nn.functional.normalize(feats, dim=1).double().numpy()
    for c in np.unique(camids):
        idx = np.flatnonzero(camids == c)
        k = pipeline.cluster_count(len(idx), 10)
        assert labels[idx].min() == 0 and labels[idx].max() == k - 1
        if len(idx) > 1:
            want = fcluster(linkage(pdist(x[idx], "cosine"), "average"), k, "maxclust")
            assert _same_partition(labels[idx], want)


def test_inter_camera_labels_rerank_and_threshold(rng):
    n = 90
    feats = torch.from_numpy(rng.standard_normal((n, 8)).astype(np.float32))
    scores = torch.softmax(torch.from_numpy(rng.standard_normal((n, 12)).astype(np.float32)), 1)
    camids = rng.integers(0, 3, n)
    d = pipeline.inter_camera_distance(feats, scores, camids, 0.02).numpy()
    labels = pipeline.inter_camera_labels(feats, scores, camids, 0.02, k=9)
    assert _same_partition(labels, fcluster(linkage(d.astype(np.float64), "average"), 9, "maxclust"))
    ranked = pipeline.inter_camera_labels(feats, scores, camids, 0.02, k=9, rerank=RERANK)
    assert len(np.unique(ranked)) == 9
    by_threshold = pipeline.inter_camera_labels(feats, scores, camids, 0.02, k=None, quantile=0.1)
    assert len(np.unique(by_threshold)) > 1
    with pytest.raises(ValueError, match="exactly one"):
        pipeline.cluster_distance(d.copy(), k=3, quantile=0.1)


@pytest.fixture
def recorded(monkeypatch):
    """Wraps every pipeline step: calls[name] lists the keyword settings each call got."""
    calls = {}
    for name in ("intra_camera_labels", "intra_camera_distance", "inter_camera_distance",
                 "rerank_distance", "merge"):
        real = getattr(pipeline, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            calls.setdefault(_name, []).append(
                {k: v for k, v in kwargs.items() if k in ("rerank", "quantile")})
            if _name == "rerank_distance":
                calls[_name][-1]["rerank"] = args[1] if len(args) > 1 else kwargs.get("rerank")
            return _real(*args, **kwargs)

        monkeypatch.setattr(pipeline, name, wrapper)
    return calls


@pytest.mark.slow
def test_trainer_and_profiler_run_the_same_pipeline(recorded, tmp_path, monkeypatch):
    """Both compute every clustering phase through the pipeline functions, with re-ranking set
    as the trainer's default: a phase computed on its own leaves its counter empty."""
    monkeypatch.setenv("IICS_FAST_CACHE", str(tmp_path / "cache"))
    options = {"num_ids": 8, "num_test_ids": 4, "num_cameras": 2, "images_per_camera": [2, 3],
               "num_distractors": 4, "seed": 3, "image_format": "png"}
    default_similarity = train.DEFAULTS["similarity"][0]
    train.main(["--dataset", "synthetic", "--dataset-options", json.dumps(options),
                "--similarity", default_similarity, "--arch", "resnet18", "--height", "32",
                "--width", "16", "--rounds", "1", "--eval-every", "0", "--k-intra", "6",
                "--k-inter", "8", "--batch-per-camera", "4", "--batch-p", "4", "--batch-k", "2",
                "--epochs-intra", "1", "--epochs-inter", "1", "--threads", "1", "--no-progress",
                "--no-verbose", "--pretrained", "none", "--out", str(tmp_path / "run")])
    trainer_calls = {k: list(v) for k, v in recorded.items()}
    recorded.clear()
    P.run_ours(300, 3, 12, log=lambda *a: None)
    profiler_calls = dict(recorded)
    for calls in (trainer_calls, profiler_calls):
        assert len(calls["intra_camera_labels"]) == 1
        assert len(calls["intra_camera_distance"]) >= 2  # one a camera
        assert len(calls["inter_camera_distance"]) == 1
        assert len(calls["rerank_distance"]) == len(calls["merge"]) == len(calls["intra_camera_distance"]) + 1
    expect = RERANK if default_similarity == "rerank" else None
    for calls in (trainer_calls, profiler_calls):
        assert all(c["rerank"] == expect for c in calls["rerank_distance"])
        assert calls["intra_camera_labels"][0]["rerank"] == expect


# ----------------------------------------------------------------------------- CUDA routing


def test_route_of_each_step(monkeypatch):
    """Where a clustering's steps run: on CUDA the Triton distance and, without re-ranking, the
    CUDA merge (no copy to the host); with re-ranking one host copy of the condensed matrix; an
    extension without the CUDA merge merges on the host after one copy; the CPU never copies."""
    from iics_fast import cluster

    monkeypatch.setattr(cluster, "has_cuda_merge", lambda: True)
    assert pipeline.route("cuda") == {"distance": "triton", "rerank": None, "merge": "cuda",
                                      "host_copies": 0}
    assert pipeline.route(torch.device("cuda", 1), RERANK) == {
        "distance": "triton", "rerank": "cpu", "merge": "cpu", "host_copies": 1}
    for rerank in (None, RERANK):
        assert pipeline.route("cpu", rerank) == {
            "distance": "cpu", "rerank": None if rerank is None else "cpu", "merge": "cpu",
            "host_copies": 0}
    monkeypatch.setattr(cluster, "has_cuda_merge", lambda: False)
    assert pipeline.route("cuda")["merge"] == "cpu" and pipeline.route("cuda")["host_copies"] == 1


@pytest.fixture
def cuda_merge_on_cpu(monkeypatch):
    """Makes CPU tensors take the CUDA merge's route: cluster_distance sees a CUDA device, and
    the launcher (given the tensor's address, as on a GPU) runs the host instantiation of the same
    passes in place there. Records every copy to the host through pipeline.to_host."""
    import ctypes

    from iics_fast import cluster
    from iics_fast._native import native

    real_route, real_native = pipeline.route, native()
    copies = []

    class FakeCudaNative:
        def __getattr__(self, name):
            return getattr(real_native, name)

        @staticmethod
        def cluster_linkage_cuda(ptr, n, method, device, stream):
            m = n * (n - 1) // 2
            view = np.ctypeslib.as_array((ctypes.c_float * m).from_address(ptr))
            return real_native.cluster_linkage(view, method, True, False, True)

    def to_host(dist):
        copies.append(tuple(dist.shape))
        return real_to_host(dist)

    real_to_host = pipeline.to_host
    monkeypatch.setattr(pipeline, "route", lambda device, rerank=None: real_route("cuda", rerank))
    monkeypatch.setattr(pipeline, "to_host", to_host)
    monkeypatch.setattr(cluster, "has_cuda_merge", lambda: True)
    monkeypatch.setattr(cluster, "_is_cuda", lambda x: isinstance(x, torch.Tensor))
    monkeypatch.setattr(cluster, "native", lambda: FakeCudaNative())
    monkeypatch.setattr(cluster, "_cuda_stream", lambda t: 0)
    return copies


def test_cuda_route_merges_on_the_device_without_copies(cuda_merge_on_cpu, rng):
    """A CUDA distance without re-ranking: the merge takes the tensor itself (no host copy), by
    k and by threshold, with SciPy's partitions; with re-ranking exactly one host copy."""
    n = 120
    feats = torch.from_numpy(rng.standard_normal((n, 8)).astype(np.float32))
    scores = torch.softmax(torch.from_numpy(rng.standard_normal((n, 12)).astype(np.float32)), 1)
    camids = rng.integers(0, 3, n)
    d = pipeline.inter_camera_distance(feats, scores, camids, 0.02)
    want = fcluster(linkage(d.numpy().astype(np.float64), "average"), 9, "maxclust")
    assert _same_partition(pipeline.cluster_distance(d.clone(), k=9), want)
    by_threshold = pipeline.cluster_distance(d.clone(), quantile=0.1)
    t = pipeline.threshold(d.numpy().copy(), 0.1)
    assert _same_partition(by_threshold, fcluster(linkage(d.numpy().astype(np.float64), "average"),
                                                  t, "distance"))
    labels = pipeline.intra_camera_labels(feats, camids, 10)
    assert cuda_merge_on_cpu == []  # nothing went through the host copy
    pipeline.cluster_distance(d.clone(), k=9, rerank=RERANK)
    assert cuda_merge_on_cpu == [(n * (n - 1) // 2,)]
    assert labels.shape == (n,)


def test_quantile_threshold_torch_equals_host(rng):
    """The torch path of quantile_threshold (CUDA tensors) against the C++ one: zeros,
    negatives, ties."""
    from iics_fast import cluster

    x = (rng.standard_normal(5001) * 2).astype(np.float32)
    x[:700] = 0.0
    x[700:900] = x[900:1100]
    for q in (0.0, 0.0017, 0.3, 0.5, 0.999):
        assert cluster._quantile_threshold_torch(torch.from_numpy(x), q) == \
            cluster.quantile_threshold(x, q)
    with pytest.raises(ValueError, match="NaN or infinite"):
        cluster._quantile_threshold_torch(torch.tensor([1.0, float("nan")]), 0.5)
    with pytest.raises(ValueError, match="every distance is 0"):
        cluster._quantile_threshold_torch(torch.zeros(6), 0.5)
