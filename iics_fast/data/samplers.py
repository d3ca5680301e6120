"""Batch samplers of the two training stages, seeded and resumable.

Both are batch samplers (give them to `DataLoader(batch_sampler=...)`) that yield lists of
`(index, sample_seed)` pairs; `ImageDataset` seeds each sample's augmentation with its
`sample_seed`. Everything an epoch draws comes from `np.random.default_rng([seed, epoch])`, so
the state of a sampler is just `{"seed", "epoch"}` and a resumed run replays the same batches.
"""
from __future__ import annotations

import numpy as np


class _SeededBatchSampler:
    """Common state handling: the epoch's batches are built once per (seed, epoch)."""

    def __init__(self, seed: int, epoch: int):
        self.seed, self.epoch = int(seed), int(epoch)
        self._cache: tuple[tuple[int, int], list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _epoch_batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != (self.seed, self.epoch):
            self._cache = ((self.seed, self.epoch), self._build(self._rng()))
        return self._cache[1]

    def _build(self, rng: np.random.Generator) -> list[list[int]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._epoch_batches())

    def __iter__(self):
        batches = self._epoch_batches()
        seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(
            0, 2**62, size=sum(len(b) for b in batches))
        pos = 0
        for batch in batches:
            yield [(int(i), int(seeds[pos + j])) for j, i in enumerate(batch)]
            pos += len(batch)


class CameraBatchSampler(_SeededBatchSampler):
    """Stage-1 sampler: each batch holds `per_camera` images of every camera, camera by camera
    (cameras in ascending id order), so the trainer can cut it into C equal chunks.

    Each camera is shuffled once per epoch and cut into consecutive chunks; an epoch is
    `min_c floor(n_c / per_camera)` batches (the smallest camera sets the length, as when the
    reference zips one shuffled loader per camera). `camera_name(camid)` names a camera in
    errors as the user knows it.
    """

    def __init__(self, camids, per_camera: int = 8, seed: int = 0, epoch: int = 0,
                 camera_name=str):
        super().__init__(seed, epoch)
        camids = np.asarray(camids)
        if camids.ndim != 1 or camids.size == 0:
            raise ValueError("CameraBatchSampler needs a non-empty 1-D sequence of camera ids")
        if per_camera < 1:
            raise ValueError(f"per_camera must be >= 1, got {per_camera}")
        self.per_camera = int(per_camera)
        self.cameras = np.unique(camids)
        self.members = [np.flatnonzero(camids == c) for c in self.cameras]
        small = [(int(c), len(m)) for c, m in zip(self.cameras, self.members)
                 if len(m) < self.per_camera]
        if small:
            cam, n = small[0]
            raise ValueError(
                f"camera {camera_name(cam)} has {n} training images but the stage-1 sampler takes "
                f"{self.per_camera} per camera per iteration: remove that camera's images from "
                f"the training set or lower --batch-per-camera to {n} or less")
        self.iterations = min(len(m) for m in self.members) // self.per_camera

    def __len__(self) -> int:
        return self.iterations

    def _build(self, rng):
        k = self.per_camera
        perms = [rng.permutation(m) for m in self.members]
        return [np.concatenate([p[i * k:(i + 1) * k] for p in perms]).tolist()
                for i in range(self.iterations)]


class PKBatchSampler(_SeededBatchSampler):
    """Stage-2 sampler: batches of P clusters x K images.

    Per epoch, each cluster is shuffled and cut into chunks of K (a cluster smaller than K
    gives one chunk drawn with replacement; a remainder smaller than K is dropped). Then, while
    at least P clusters still have chunks, P of them are drawn at random and each gives its
    next chunk. Images of a batch are grouped by cluster, K consecutive.
    """

    def __init__(self, labels, p: int = 16, k: int = 4, seed: int = 0, epoch: int = 0):
        super().__init__(seed, epoch)
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError("PKBatchSampler needs a 1-D sequence of labels")
        if p < 1 or k < 1:
            raise ValueError(f"P and K must be >= 1, got P={p}, K={k}")
        self.p, self.k = int(p), int(k)
        keep = labels >= 0
        self.clusters = np.unique(labels[keep])
        if len(self.clusters) < self.p:
            raise ValueError(
                f"PK sampling needs at least P={self.p} clusters but the labels have "
                f"{len(self.clusters)}: ask for more clusters or lower --batch-p")
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        self.members = [order[np.searchsorted(sorted_labels, c, "left"):
                              np.searchsorted(sorted_labels, c, "right")]
                        for c in self.clusters]

    def _build(self, rng):
        k = self.k
        chunks = []
        for m in self.members:
            idx = rng.choice(m, size=k, replace=True) if len(m) < k else rng.permutation(m)
            chunks.append([idx[j * k:(j + 1) * k].tolist() for j in range(len(idx) // k)])
        left = np.array([len(c) for c in chunks])
        taken = np.zeros(len(chunks), dtype=np.int64)
        batches = []
        while True:
            available = np.flatnonzero(taken < left)
            if len(available) < self.p:
                break
            chosen = rng.choice(available, size=self.p, replace=False)
            batch = []
            for c in chosen:
                batch.extend(chunks[c][taken[c]])
                taken[c] += 1
            batches.append(batch)
        return batches
