"""The clustering steps of one IICS round as plain functions, shared by the trainer, the profiler
(benchmarks/profile.py) and the tests, so that what is timed is what is trained.

    intra_camera_labels(features, camids, k_intra=600)           # per camera, labels 0.. each
        = intra_camera_distance(camera's features) -> cluster_distance(...)
    inter_camera_distance(features, scores, camids, mu)          # Eq. 5, condensed
    cluster_distance(dist, k=800)                                # re-rank, then average linkage
        = rerank_distance(dist, rerank) -> merge(dist, k | threshold)

Distances are condensed (SciPy `pdist` order) float32. The distance builds take torch tensors on
any device and return them there (the Triton kernels on CUDA, the C++ core on the CPU). `route`
says where the rest of a clustering runs: on a CUDA device without re-ranking the merge (and the
threshold) run there too and only the linkage matrix comes back; with re-ranking, which runs on
the host, the condensed matrix is copied to the host once (`to_host`, the round's only copy of an
N x N or N x D tensor to the host) and re-ranked and merged there in place. `rerank` is None
(plain distance) or a mapping of `k_reciprocal`'s parameters k1, k2, lambda_value. The round,
step by step: docs/method.md.
"""
from __future__ import annotations

import numpy as np
import torch

from . import cluster, distributed, rerank as _rerank, similarity

def cluster_count(n_c: int, k_intra: int) -> int:
    """Intra-camera clusters of a camera with n_c images: k_intra, or max(1, n_c // 2) when the
    camera has fewer images (each camera on its own; see docs/deviations.md)."""
    return k_intra if n_c >= k_intra else max(1, n_c // 2)


def route(device, rerank=None) -> dict:
    """Where each step of a clustering runs for a distance built on `device`:
    distance ("triton" on CUDA, "cpu"), rerank (None or "cpu"), merge ("cuda" or "cpu": on CUDA
    when the extension has the CUDA merge and nothing runs on the host before it) and
    host_copies (copies of the condensed matrix to the host: 1 when a CUDA distance is merged on
    the host, else 0)."""
    cuda = torch.device(device).type == "cuda"
    on_device = cuda and rerank is None and cluster.has_cuda_merge()
    return {"distance": "triton" if cuda else "cpu",
            "rerank": None if rerank is None else "cpu",
            "merge": "cuda" if on_device else "cpu",
            "host_copies": int(cuda and not on_device)}


def to_host(dist: torch.Tensor) -> np.ndarray:
    """The host copy of a condensed distance on a device (the one copy a clustering may make)."""
    return dist.detach().cpu().numpy()


def rerank_distance(dist: np.ndarray, rerank=None) -> np.ndarray:
    """k-reciprocal re-ranking of the condensed `dist` in place (nothing when rerank is None)."""
    if rerank is not None:
        _rerank.k_reciprocal(dist, **dict(rerank), out=dist)
    return dist


def threshold(dist, quantile: float) -> float:
    """The reference's threshold: the distance at `quantile` of the nonzero pairwise distances,
    rank round(quantile * count) (see `cluster.quantile_threshold`)."""
    return cluster.quantile_threshold(dist, quantile)


def merge(dist, k: int | None = None, quantile: float | None = None) -> np.ndarray:
    """Average-linkage labels of the condensed `dist` (destroyed; a host array, or a CUDA tensor
    merged on its device): k clusters, or every merge below the distance at `quantile` when k is
    None."""
    if quantile is None:
        return np.asarray(cluster.agglomerative(dist, n_clusters=k, inplace=True))
    return np.asarray(cluster.agglomerative(dist, distance_threshold=threshold(dist, quantile),
                                            inplace=True))


def cluster_distance(dist, *, k: int | None = None, quantile: float | None = None,
                     rerank=None) -> np.ndarray:
    """One clustering of a round: re-rank (optional) then average linkage, in place on `dist`,
    where `route` says."""
    if (k is None) == (quantile is None):
        raise ValueError("give exactly one of k (a cluster count) and quantile (a threshold)")
    device = dist.device if isinstance(dist, torch.Tensor) else "cpu"
    plan = route(device, rerank)
    if plan["merge"] == "cuda":
        return merge(dist.detach(), k, quantile)
    if isinstance(dist, torch.Tensor):
        dist = to_host(dist) if plan["host_copies"] else dist.detach().numpy()
    dist = rerank_distance(np.asarray(dist), rerank)
    return merge(dist, k, quantile)


def intra_camera_distance(features: torch.Tensor) -> torch.Tensor:
    """Condensed 1 - cos of one camera's features (normalised here), on their device."""
    one_camera = torch.zeros(len(features), dtype=torch.int64, device=features.device)
    return similarity.inter_camera_distance(features, None, one_camera, mode="feature")


def intra_camera_labels(features: torch.Tensor, camids: np.ndarray, k_intra: int | None = 600,
                        *, quantile: float | None = None, rerank=None, progress=None) -> np.ndarray:
    """Per camera: 1 - cos, optional re-ranking, average linkage into `cluster_count(n_c,
    k_intra)` clusters (or by the threshold at `quantile` with k_intra None). Labels are 0-based
    within each camera (int64, one per sample). `progress`: optional wrapper of the camera loop."""
    camids = np.asarray(camids)
    labels = np.zeros(len(camids), dtype=np.int64)
    cameras = np.unique(camids)
    for c in (progress(cameras) if progress is not None else cameras):
        idx = np.flatnonzero(camids == c)
        if len(idx) < 2:
            continue  # one image: one cluster
        k = None if quantile is not None else cluster_count(len(idx), k_intra)
        dist = intra_camera_distance(features[torch.from_numpy(idx)])
        labels[idx] = cluster_distance(dist, k=k, quantile=quantile, rerank=rerank)
    return labels


def inter_camera_distance(features: torch.Tensor, scores: torch.Tensor, camids, mu: float,
                          mode: str = "eq5"):
    """Condensed inter-camera distance of Eq. 5 (or an ablation `mode`: "feature", "jaccard").
    Under several processes every rank builds its share of the rows and rank 0 receives the
    whole vector (None on the other ranks; inputs on the process group's device)."""
    if distributed.world_size() > 1:
        return similarity.sharded_inter_camera_distance(features, scores, camids, mu, mode=mode)
    return similarity.inter_camera_distance(features, scores, camids, mu, out="condensed",
                                            mode=mode)


def inter_camera_labels(features, scores, camids, mu: float, *, mode: str = "eq5",
                        k: int | None = 800, quantile: float | None = None, rerank=None):
    """Inter-camera pseudo labels: `inter_camera_distance` then `cluster_distance` (on rank 0
    under several processes, its labels broadcast)."""
    dist = inter_camera_distance(features, scores, camids, mu, mode)
    labels = None if dist is None else cluster_distance(dist, k=k, quantile=quantile,
                                                         rerank=rerank)
    return distributed.broadcast_object(labels)


__all__ = ["cluster_count", "route", "to_host", "rerank_distance", "threshold", "merge",
           "cluster_distance", "intra_camera_distance", "intra_camera_labels",
           "inter_camera_distance", "inter_camera_labels"]
