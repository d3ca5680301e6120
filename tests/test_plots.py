"""The ranked-list figure: the protocol's exclusions, the match flags, and the drawing."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from iics_fast.plots import plot_ranked_lists, ranked_lists


@pytest.fixture
def images(tmp_path):
    paths = []
    for i in range(8):
        p = str(tmp_path / f"{i}.png")
        Image.fromarray(np.full((16, 8, 3), 30 * i, np.uint8)).save(p)
        paths.append(p)
    return paths


def test_ranked_lists_follow_the_evaluation_protocol(images):
    # one query: id 1, camera 0; gallery ranked by distance to it in index order 0..5
    query = [(images[0], 1, 0)]
    gallery = [(images[1], 1, 0),   # same id, same camera: left out
               (images[2], -1, 1),  # junk: left out
               (images[3], 2, 1),   # wrong id
               (images[4], 1, 1),   # true match
               (images[5], 0, 0),   # distractor: never a match
               (images[6], 1, 2)]   # true match
    qf = torch.tensor([[1.0, 0.0]])
    angles = np.linspace(0.0, 1.4, len(gallery))
    gf = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], 1), dtype=torch.float32)
    (q, ranked), = ranked_lists(qf, gf, query, gallery, num_queries=3, top_k=3)
    assert q == query[0]
    assert [g[0] for g, _, _ in ranked] == [images[3], images[4], images[5]]
    assert [m for _, _, m in ranked] == [False, True, False]
    dists = [d for _, d, _ in ranked]
    assert dists == sorted(dists) and dists[0] == pytest.approx(1 - np.cos(angles[2]), abs=1e-6)


def test_queries_without_a_cross_camera_match_are_not_drawn(images):
    query = [(images[0], 1, 0), (images[1], 2, 0)]
    gallery = [(images[2], 1, 0), (images[3], 2, 1)]  # only id 2 has a match elsewhere
    f = torch.randn(2, 4)
    lists = ranked_lists(f, torch.randn(2, 4), query, gallery, num_queries=2)
    assert [q[1] for q, _ in lists] == [2]


def test_unknown_identities_give_no_match_flags(images, tmp_path):
    lists = ranked_lists(torch.randn(1, 4), torch.randn(5, 4), [(images[0], None, -1)],
                         [(p, None, -1) for p in images[1:6]], num_queries=1, top_k=4)
    assert [m for _, _, m in lists[0][1]] == [None] * 4
    out = str(tmp_path / "r.png")
    plot_ranked_lists(lists, out, title="t")
    assert os.path.getsize(out) > 1000


def test_a_dataset_without_identities_still_ranks_its_gallery(images):
    """A folder's pid -1 is junk only where identities are known: a dataset that is not
    evaluable shows its top-k gallery images with no match flag (grey frames)."""
    query = [(images[0], -1, 0)]
    gallery = [(p, -1, 0) for p in images[1:6]]
    qf, gf = torch.randn(1, 4), torch.randn(5, 4)
    assert ranked_lists(qf, gf, query, gallery, top_k=3)[0][1] == []  # known ids: all junk
    (q, ranked), = ranked_lists(qf, gf, query, gallery, top_k=3, known=False)
    assert q == (images[0], None, 0)
    assert len(ranked) == 3 and [m for _, _, m in ranked] == [None] * 3
    order = np.argsort((1 - torch.nn.functional.normalize(gf, dim=1)
                        @ torch.nn.functional.normalize(qf, dim=1)[0]).numpy(), kind="stable")
    assert [g[0] for g, _, _ in ranked] == [gallery[j][0] for j in order[:3]]
