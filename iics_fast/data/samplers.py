"""Batch samplers of the two training stages, seeded and resumable.

Both are batch samplers (give them to `DataLoader(batch_sampler=...)`) that yield lists of
`(index, sample_seed)` pairs; `ImageDataset` seeds each sample's augmentation with its
`sample_seed`. Everything an epoch draws comes from `np.random.default_rng([seed, epoch])`, so
the state of a sampler is just `{"seed", "epoch"}` and a resumed run replays the same batches.
`ShardedBatchSampler` gives each process of a torchrun launch its part of every batch.
"""
from __future__ import annotations

import numpy as np

from iics_fast import distributed as D


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
    reference zips one shuffled loader per camera).
    """

    def __init__(self, camids, per_camera: int = 8, seed: int = 0, epoch: int = 0):
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
                f"camera {cam} has {n} training images but the stage-1 sampler takes "
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


def group_share(n_groups: int, rank: int, world: int) -> range:
    """The contiguous groups ceil(rank G / world) .. ceil((rank + 1) G / world) - 1 of G groups
    that rank `rank` of `world` takes (see ShardedBatchSampler, split="within")."""
    return range(-(-rank * n_groups // world), -(-(rank + 1) * n_groups // world))


def _split_units(batch, group_size):
    if len(batch) % group_size:
        raise ValueError(f"a batch of {len(batch)} items is not a whole number of groups of "
                         f"{group_size}: pass the sampler's group size (per_camera, or K of P x K)")
    return [batch[i:i + group_size] for i in range(0, len(batch), group_size)]


class ShardedBatchSampler:
    """Gives this rank its part of a batch sampler (any iterable of lists of indices, or of
    `(index, seed)` pairs: items are passed through untouched).

    split="within" (default): every global batch is cut into `world` parts of whole groups of
    `group_size` consecutive items, rank r taking groups ceil(r G / world) .. ceil((r+1) G / world) - 1
    of the G groups (contiguous, counts differ by at most one): the ranks' parts of a step are disjoint and together are exactly the
    global batch, so the global batch size and the learning rate stay those of one process.
    With the stage-1 camera sampler use group_size = per_camera (each camera's images stay on
    one rank, whose batch-norm statistics then stay per camera); with a P x K sampler use
    group_size = K (an identity's K images stay together, so in-batch positives for triplet
    losses exist on the rank). Every batch needs at least `world` groups.

    split="across": rank r takes the global batches r, r + world, r + 2 world, ...; the tail
    that does not fill all ranks is dropped so that every rank runs the same number of steps.
    Each step then processes world x the batch: by the linear scaling rule multiply the learning
    rate by `world` (with a warm-up), or keep it and accept 1/world of the steps per epoch.

    `set_epoch`, `state_dict` and `load_state_dict` are forwarded to the wrapped sampler, so a
    seeded sampler yields the same global batches on every rank."""

    def __init__(self, batch_sampler, *, split="within", group_size=1, rank=None, world=None):
        if split not in ("within", "across"):
            raise ValueError(f"split must be 'within' or 'across', got {split!r}")
        group_size = int(group_size)
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.sampler = batch_sampler
        self.split = split
        self.group_size = group_size
        self.world = D.world_size() if world is None else int(world)
        self.rank = D.rank() if rank is None else int(rank)
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"need world >= 1 and 0 <= rank < world, got rank={self.rank}, world={self.world}")

    def __len__(self):
        n = len(self.sampler)
        return n if self.split == "within" else n // self.world

    def __iter__(self):
        if self.split == "across":
            it = iter(self.sampler)
            while True:
                step = []
                for _ in range(self.world):
                    try:
                        step.append(next(it))
                    except StopIteration:
                        return
                yield list(step[self.rank])
            return
        for batch in self.sampler:
            units = _split_units(list(batch), self.group_size)
            if len(units) < self.world:
                raise ValueError(f"a batch of {len(units)} groups cannot give each of {self.world} "
                                 f"ranks a share: use split='across' or a larger batch")
            share = self.share(len(units))
            yield [item for unit in units[share.start:share.stop] for item in unit]

    def share(self, n_groups: int) -> range:
        """Positions of the groups this rank gets of a batch of `n_groups` groups (split="within"):
        with the camera sampler, which cameras' chunks (hence which per-camera heads) are here."""
        return group_share(n_groups, self.rank, self.world)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state)
