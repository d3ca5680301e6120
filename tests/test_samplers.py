"""Stage-1 per-camera and stage-2 PK batch samplers: composition, epoch length, determinism."""
import numpy as np
import pytest

from iics_fast.data.samplers import CameraBatchSampler, PKBatchSampler


def _indices(batch):
    return [i for i, _ in batch]


def test_camera_sampler_composition_and_length(rng):
    counts = {0: 19, 2: 33, 5: 8, 7: 40}  # camera ids need not be contiguous
    camids = rng.permutation(np.repeat(list(counts), list(counts.values())))
    s = CameraBatchSampler(camids, per_camera=8, seed=3)
    assert len(s) == min(n // 8 for n in counts.values()) == 1
    s = CameraBatchSampler(camids[camids != 5], per_camera=4, seed=3)
    assert len(s) == min(19, 33, 40) // 4
    batches = list(s)
    assert len(batches) == len(s)
    sub = camids[camids != 5]
    for batch in batches:
        idx = _indices(batch)
        assert len(idx) == 3 * 4
        # camera by camera, ascending camera id, 4 each
        assert sub[idx].tolist() == [0] * 4 + [2] * 4 + [7] * 4
    # within an epoch no image repeats
    flat = np.concatenate([_indices(b) for b in batches])
    assert len(np.unique(flat)) == len(flat)


def test_camera_sampler_determinism_and_epochs(rng):
    camids = rng.integers(0, 3, size=120)
    a = CameraBatchSampler(camids, 8, seed=11)
    b = CameraBatchSampler(camids, 8, seed=11)
    assert list(a) == list(b)  # indices and sample seeds
    a.set_epoch(1)
    assert list(a) != list(b)
    b.load_state_dict(a.state_dict())
    assert list(a) == list(b)
    c = CameraBatchSampler(camids, 8, seed=12)
    assert [_indices(x) for x in c] != [_indices(x) for x in b]


def test_camera_sampler_small_camera_is_named():
    camids = np.array([0] * 10 + [1] * 5 + [2] * 12)
    with pytest.raises(ValueError, match="camera 1 has 5 training images"):
        CameraBatchSampler(camids, 8)


def test_pk_sampler_composition(rng):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(rng.integers(1, 11, size=40))])
    labels = rng.permutation(labels)
    s = PKBatchSampler(labels, p=6, k=4, seed=5)
    batches = list(s)
    assert len(batches) == len(s) > 0
    used = {}
    for batch in batches:
        idx = np.array(_indices(batch))
        assert len(idx) == 6 * 4
        groups = labels[idx].reshape(6, 4)
        assert (groups == groups[:, :1]).all()  # K consecutive images of one cluster
        assert len(np.unique(groups[:, 0])) == 6  # P distinct clusters
        for c in groups[:, 0]:
            used[c] = used.get(c, 0) + 1
    sizes = np.bincount(labels)
    for c, times in used.items():
        assert times <= max(1, sizes[c] // 4)  # each chunk of K used once per epoch
    # a cluster smaller than K is drawn with replacement from its own images
    small = [c for c in used if sizes[c] < 4]
    assert small  # the draw above has such clusters
    # every cluster still holding chunks when the epoch stops: fewer than P of them
    remaining = sum(1 for c in range(len(sizes)) if used.get(c, 0) < max(1, sizes[c] // 4))
    assert remaining < 6


def test_pk_sampler_epoch_length():
    labels = np.repeat(np.arange(32), 4)  # 32 clusters x 1 chunk -> exactly 2 batches of 16
    s = PKBatchSampler(labels, p=16, k=4, seed=0)
    assert len(s) == 2
    flat = np.concatenate([_indices(b) for b in s])
    assert sorted(flat.tolist()) == list(range(128))
    # 2 chunks a cluster: 64 chunks, but the epoch stops once fewer than P clusters have any
    # left: 3 or 4 batches (4 only when every pick leaves P clusters available)
    s = PKBatchSampler(np.repeat(np.arange(32), 8), p=16, k=4, seed=0)
    lengths = set()
    for epoch in range(10):
        s.set_epoch(epoch)
        lengths.add(len(s))
        assert len(list(s)) == len(s)
    assert lengths <= {3, 4}


def test_pk_sampler_determinism(rng):
    labels = rng.integers(0, 30, size=300)
    a, b = PKBatchSampler(labels, 8, 4, seed=1), PKBatchSampler(labels, 8, 4, seed=1)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    a.load_state_dict({"seed": 1, "epoch": 4})
    assert list(a) == list(b)


def test_pk_sampler_needs_p_clusters():
    with pytest.raises(ValueError, match="at least P=16 clusters"):
        PKBatchSampler(np.arange(10), 16, 4)
