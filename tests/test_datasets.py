import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from iics_fast import datasets
from iics_fast.data import synthetic
from iics_fast.datasets import DatasetError

_JPEG = None


def _jpeg() -> bytes:
    global _JPEG
    if _JPEG is None:
        buf = io.BytesIO()
        Image.new("RGB", (4, 8), (120, 30, 200)).save(buf, "JPEG")
        _JPEG = buf.getvalue()
    return _JPEG


def _touch(folder, *names):
    os.makedirs(folder, exist_ok=True)
    for n in names:
        with open(os.path.join(folder, n), "wb") as fh:
            fh.write(_jpeg())


def _market_tree(root, train=None, query=None, gallery=None):
    _touch(os.path.join(root, "bounding_box_train"), *(train or [
        "0002_c1s1_000451_03.jpg", "0002_c3s1_000551_01.jpg", "0007_c2s3_070952_01.jpg",
        "-1_c1s1_000401_03.jpg"]))
    _touch(os.path.join(root, "query"), *(query or [
        "0003_c1s1_000101_00.jpg", "0004_c6s1_001001_00.jpg"]))
    _touch(os.path.join(root, "bounding_box_test"), *(gallery or [
        "0003_c4s1_000201_01.jpg", "0000_c2s1_000151_01.jpg", "-1_c5s1_000401_03.jpg",
        "0004_c5s2_001101_02.jpg"]))
    with open(os.path.join(root, "bounding_box_train", "Thumbs.db"), "wb") as fh:
        fh.write(b"not an image")  # non-image files are ignored
    return str(root)


def _names(items):
    return [(os.path.basename(p), pid, cam) for p, pid, cam in items]


# ----------------------------------------------------------------------------- market / duke
def test_market1501_layout(tmp_path):
    ds = datasets.build("market1501", _market_tree(tmp_path))
    assert ds.name == "market1501" and ds.num_cameras == 6
    assert ds.camera_names == [1, 2, 3, 4, 5, 6]
    assert _names(ds.train) == [("0002_c1s1_000451_03.jpg", 2, 0), ("0002_c3s1_000551_01.jpg", 2, 2),
                                ("0007_c2s3_070952_01.jpg", 7, 1)]  # junk -1 skipped
    assert _names(ds.query) == [("0003_c1s1_000101_00.jpg", 3, 0), ("0004_c6s1_001001_00.jpg", 4, 5)]
    assert _names(ds.gallery) == [("0000_c2s1_000151_01.jpg", 0, 1),  # distractor kept
                                  ("0003_c4s1_000201_01.jpg", 3, 3), ("0004_c5s2_001101_02.jpg", 4, 4)]
    assert all(os.path.isabs(p) for p, _, _ in ds.train)
    assert ds.train_labelled and ds.evaluable
    text = ds.summary()
    lines = {ln.split("|")[0].strip(): [c.strip() for c in ln.split("|")[1:]]
             for ln in text.splitlines()[1:] if "|" in ln}
    assert lines["train"] == ["2", "3", "3"] and lines["gallery"] == ["3", "3", "3"]


def test_market1501_found_inside_unpacked_archive_folder(tmp_path):
    _market_tree(tmp_path / "Market-1501-v15.09.15")
    ds = datasets.build("market", tmp_path)
    assert ds.root.endswith("Market-1501-v15.09.15") and len(ds.train) == 3


def test_cameras_are_remapped_in_numbering_order(tmp_path):
    root = _market_tree(tmp_path, train=["0001_c5s1_000001_00.jpg", "0001_c2s1_000001_00.jpg"],
                        query=["0002_c5s1_000001_00.jpg"], gallery=["0002_c3s1_000001_00.jpg"])
    ds = datasets.build("market1501", root)
    assert ds.camera_names == [2, 3, 5] and ds.num_cameras == 3
    assert [c for _, _, c in ds.train] == [0, 2]
    assert ds.query[0][2] == 2 and ds.gallery[0][2] == 1
    assert ds.train_cameras == [0, 2]


def test_dukemtmc_layout(tmp_path):
    root = _market_tree(tmp_path, train=["0005_c2_f0046985.jpg", "0005_c8_f0046999.jpg"],
                        query=["0010_c1_f0000001.jpg"], gallery=["0010_c7_f0000100.jpg"])
    ds = datasets.build("dukemtmc", root)
    assert _names(ds.train) == [("0005_c2_f0046985.jpg", 5, 1), ("0005_c8_f0046999.jpg", 5, 3)]
    assert ds.camera_names == [1, 2, 7, 8]


@pytest.mark.parametrize("setup, name, match", [
    (lambda r: os.makedirs(r / "other"), "market1501", "expected bounding_box_train/"),
    (lambda r: (_market_tree(r), shutil.rmtree(r / "query")), "market1501",
     "missing folder .*query .*the query images"),
    (lambda r: _market_tree(r, query=["-1_c1s1_000101_00.jpg"]), "market1501",
     "query split is empty"),
    (lambda r: _market_tree(r, train=["0002_c1s1_000451_03.jpg", "foo.jpg"]), "market1501",
     "cannot parse the file name .*foo.jpg: expected names like 0002_c1s1"),
    (lambda r: _market_tree(r, train=["0005_c2_f0046985.jpg"]), "market1501",
     "0005_c2_f0046985.jpg"),  # a Duke name in a Market tree
    (lambda r: _market_tree(r, train=["0002_c7s1_000451_03.jpg"]), "market1501",
     "camera 7 in .* outside the expected 1..6"),
    (lambda r: _market_tree(r, train=["0005_c9_f0046985.jpg"], query=["0005_c1_f0046985.jpg"],
                            gallery=["0005_c2_f0046985.jpg"]), "dukemtmc", "camera 9"),
])
def test_market_style_errors(tmp_path, setup, name, match):
    setup(tmp_path)
    with pytest.raises(DatasetError, match=match):
        datasets.build(name, tmp_path)


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="missing folder .*nowhere .*the market1501 root"):
        datasets.build("market1501", tmp_path / "nowhere")


def test_unreadable_image(tmp_path):
    root = _market_tree(tmp_path)
    bad = os.path.join(root, "bounding_box_test", "0003_c4s1_000201_01.jpg")
    with open(bad, "wb") as fh:
        fh.write(b"\xff\xd8 truncated nonsense")
    datasets.build("market1501", root)  # not checked by default
    with pytest.raises(DatasetError, match="unreadable image .*0003_c4s1_000201_01.jpg"):
        datasets.build("market1501", root, verify=True)
    with pytest.raises(DatasetError, match="cannot read image .*0003_c4s1_000201_01.jpg"):
        datasets.read_image(bad)
    assert datasets.read_image(os.path.join(root, "query", "0003_c1s1_000101_00.jpg")).size == (4, 8)


# ----------------------------------------------------------------------------- msmt17
def _msmt_tree(root, version=1):
    train_dir, test_dir = {1: ("train", "test"), 2: ("mask_train_v2", "mask_test_v2")}[version]
    lists = {
        "list_train.txt": [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                           ("0000/0000_001_14_0303morning_0020_1.jpg", 0),
                           ("0001/0001_000_03_0303noon_0100_0.jpg", 1)],
        "list_val.txt": [("0002/0002_000_15_0303noon_0200_0.jpg", 2)],
        "list_query.txt": [("0000/0000_000_07_0303morning_0015_0.jpg", 0)],
        "list_gallery.txt": [("0000/0000_003_02_0303morning_0015_0.jpg", 0),
                             ("0005/0005_000_07_0303morning_0015_0.jpg", 5)],
    }
    for lst, rows in lists.items():
        base = os.path.join(root, train_dir if lst in ("list_train.txt", "list_val.txt") else test_dir)
        for rel, _ in rows:
            _touch(os.path.join(base, os.path.dirname(rel)), os.path.basename(rel))
        with open(os.path.join(root, lst), "w") as fh:
            fh.write("".join(f"{rel} {pid}\n" for rel, pid in rows))
    return str(root)


@pytest.mark.parametrize("version", [1, 2])
def test_msmt17_versions_and_val(tmp_path, version):
    _msmt_tree(tmp_path / f"MSMT17_V{version}", version)
    ds = datasets.build("msmt17", tmp_path, combine_val=True)
    assert ds.info["version"] == version and ds.name == "msmt17"
    assert ds.camera_names == [1, 2, 3, 7, 14, 15]
    assert _names(ds.train) == [("0000_000_01_0303morning_0015_0.jpg", 0, 0),
                                ("0000_001_14_0303morning_0020_1.jpg", 0, 4),
                                ("0001_000_03_0303noon_0100_0.jpg", 1, 2),
                                ("0002_000_15_0303noon_0200_0.jpg", 2, 5)]
    sub = "train" if version == 1 else "mask_train_v2"
    assert os.sep + sub + os.sep in ds.train[0][0]
    assert [c for _, _, c in ds.gallery] == [1, 3]
    assert len(datasets.build("msmt17", tmp_path, combine_val=False).train) == 3


def test_msmt17_default_trains_on_list_train_only(tmp_path):
    """The reference registers list_train.txt alone; list_val.txt joins only on request."""
    root = _msmt_tree(tmp_path / "MSMT17_V2", 2)
    with open(os.path.join(root, "list_train.txt")) as fh:
        listed = [os.path.basename(line.split()[0]) for line in fh if line.strip()]
    ds = datasets.build("msmt17", tmp_path)
    assert sorted(os.path.basename(p) for p, _, _ in ds.train) == sorted(listed)
    assert ds.info["combine_val"] is False
    assert len(datasets.build("msmt17", tmp_path, combine_val=True).train) == len(listed) + 1


def test_msmt17_errors(tmp_path):
    root = _msmt_tree(tmp_path / "a", 1)
    _msmt_tree(tmp_path / "a", 2)
    with pytest.raises(DatasetError, match="both MSMT17 V1 and V2"):
        datasets.build("msmt17", root)
    assert datasets.build("msmt17", root, version=2).info["version"] == 2
    with pytest.raises(DatasetError, match="version must be 1, 2"):
        datasets.build("msmt17", root, version=3)

    root = _msmt_tree(tmp_path / "b", 1)
    os.remove(os.path.join(root, "list_val.txt"))
    with pytest.raises(DatasetError, match="missing MSMT17 list file .*list_val.txt"):
        datasets.build("msmt17", root, combine_val=True)
    assert len(datasets.build("msmt17", root).train) == 3

    root = _msmt_tree(tmp_path / "c", 1)
    with open(os.path.join(root, "list_query.txt"), "a") as fh:
        fh.write("0000/0000_000_xx_0303morning_0015_0.jpg 0\n")
    with pytest.raises(DatasetError, match=r"list_query.txt:2: cannot read the camera from"):
        datasets.build("msmt17", root)

    root = _msmt_tree(tmp_path / "d", 1)
    with open(os.path.join(root, "list_gallery.txt"), "a") as fh:
        fh.write("just-one-field\n")
    with pytest.raises(DatasetError, match=r"list_gallery.txt:3: expected 'relative/path.jpg pid'"):
        datasets.build("msmt17", root)

    root = _msmt_tree(tmp_path / "e", 1)
    os.remove(os.path.join(root, "test", "0005", "0005_000_07_0303morning_0015_0.jpg"))
    with pytest.raises(DatasetError, match="1 images listed in .*list_gallery.txt are missing"):
        datasets.build("msmt17", root)

    root = _msmt_tree(tmp_path / "f", 1)
    shutil.rmtree(os.path.join(root, "test"))
    with pytest.raises(DatasetError, match=r"neither train/\+test/"):
        datasets.build("msmt17", root)

    root = _msmt_tree(tmp_path / "g", 1)
    open(os.path.join(root, "list_query.txt"), "w").close()
    with pytest.raises(DatasetError, match="query split is empty"):
        datasets.build("msmt17", root)


# ----------------------------------------------------------------------------- synthetic
SMALL = dict(num_ids=12, num_test_ids=6, num_cameras=4, images_per_camera=(1, 2),
             num_distractors=5, height=64, width=32)


def test_synthetic_is_deterministic_by_seed():
    a, plan_a = synthetic.render_synthetic(**SMALL, seed=3)
    b, plan_b = synthetic.render_synthetic(**SMALL, seed=3)
    c, plan_c = synthetic.render_synthetic(**SMALL, seed=4)
    assert plan_a == plan_b and np.array_equal(a, b)
    assert a.shape[1:] == (64, 32, 3) and a.dtype == np.uint8
    assert plan_a != plan_c or not np.array_equal(a, c)


def test_synthetic_layout_and_counts(tmp_path):
    ds = datasets.build("synthetic", tmp_path, **SMALL, seed=1)
    _, plan = synthetic.render_synthetic(**SMALL, seed=1)
    assert ds.name == "synthetic" and ds.num_cameras == 4 and ds.camera_names == [1, 2, 3, 4]
    for split in ("train", "query", "gallery"):
        got = sorted((pid, cam) for _, pid, cam in getattr(ds, split))
        assert got == sorted((pid, cam) for s, pid, cam in plan if s == split)
    assert {pid for _, pid, _ in ds.train} == set(range(1, 13))
    test_ids = set(range(13, 19))
    assert {pid for _, pid, _ in ds.query} == test_ids
    assert {pid for _, pid, _ in ds.gallery} == test_ids | {0}
    assert sum(pid == 0 for _, pid, _ in ds.gallery) == 5
    for pid in range(1, 19):  # every id is seen by at least two cameras
        items = ds.train + ds.query + ds.gallery
        assert len({c for _, p, c in items if p == pid}) >= 2
    # one query per (id, camera); each keeps a gallery match under another camera
    assert len(ds.query) == len({(p, c) for _, p, c in ds.query})
    for _, p, c in ds.query:
        assert any(gp == p and gc != c for _, gp, gc in ds.gallery)
    assert ds.train_labelled and ds.evaluable
    assert ds.info["options"]["seed"] == 1
    with Image.open(ds.train[0][0]) as im:
        assert im.format == "JPEG" and im.size == (32, 64)
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 1 and names[0].startswith("synthetic-")  # no temporary folder left


def test_synthetic_cache_is_keyed_by_options(tmp_path, monkeypatch):
    a = synthetic.make_synthetic(str(tmp_path), **SMALL, seed=1)
    b = synthetic.make_synthetic(str(tmp_path), **SMALL, seed=2)
    c = synthetic.make_synthetic(str(tmp_path), **SMALL, seed=1, image_format="png")
    assert len({a, b, c}) == 3
    assert os.listdir(os.path.join(c, "query"))[0].endswith(".png")
    # The same options reuse the folder without drawing again.
    monkeypatch.setattr(synthetic, "render_synthetic", lambda **kw: pytest.fail("redrawn"))
    assert synthetic.make_synthetic(str(tmp_path), **SMALL, seed=1) == a
    monkeypatch.setenv("IICS_FAST_CACHE", str(tmp_path / "env"))
    assert synthetic.default_cache_dir() == str(tmp_path / "env")


def test_synthetic_killed_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_save(self, path, *args, **kw):
        calls.append(path)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return original(self, path, *args, **kw)

    original = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        synthetic.make_synthetic(str(tmp_path), **SMALL)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(Image.Image, "save", original)
    assert len(datasets.build("synthetic", tmp_path, **SMALL).train) > 0


def _colour_histograms(images):
    q = images.reshape(len(images), -1, 3) // 32  # 8 levels a channel, 512 joint bins
    code = q[..., 0].astype(np.int64) * 64 + q[..., 1] * 8 + q[..., 2]
    h = np.stack([np.bincount(c, minlength=512) for c in code]).astype(np.float64)
    return h / h.sum(1, keepdims=True)


def test_synthetic_cross_camera_similarity_is_misleading():
    images, plan = synthetic.render_synthetic(num_ids=30, num_test_ids=2, num_cameras=5,
                                              num_distractors=0, height=64, width=32, seed=7)
    train = [i for i, (s, _, _) in enumerate(plan) if s == "train"]
    hist = _colour_histograms(images[train])
    pid = np.array([plan[i][1] for i in train])
    cam = np.array([plan[i][2] for i in train])
    dist = np.abs(hist[:, None] - hist[None]).sum(-1)
    same_id, same_cam = pid[:, None] == pid[None], cam[:, None] == cam[None]
    other = ~np.eye(len(train), dtype=bool)
    # Different people under one camera look closer than one person under two cameras ...
    assert dist[same_cam & ~same_id].mean() < dist[same_id & ~same_cam].mean()
    # ... so raw cross-camera nearest neighbours are mostly wrong,
    cross_nn = np.where(~same_cam, dist, np.inf).argmin(1)
    raw_cross = (pid[cross_nn] == pid).mean()
    # while within a camera identity is plain to see,
    within = np.where(same_cam & other, dist, np.inf)
    has_pair = (same_cam & same_id & other).any(1)
    within_acc = (pid[within.argmin(1)] == pid)[has_pair].mean()
    assert within_acc > 0.8 and raw_cross < 0.3
    # and across cameras it is recoverable once each camera's style is normalised away.
    f = images[train].astype(np.float64).reshape(len(train), 8, 8, 4, 8, 3).mean((2, 4))
    f = f.reshape(len(train), -1)
    for c in np.unique(cam):
        f[cam == c] = (f[cam == c] - f[cam == c].mean(0)) / (f[cam == c].std(0) + 1e-6)
    dn = ((f[:, None] - f[None]) ** 2).sum(-1)
    norm_cross = (pid[np.where(~same_cam, dn, np.inf).argmin(1)] == pid).mean()
    assert norm_cross > raw_cross + 0.2


@pytest.mark.parametrize("options, match", [
    (dict(num_cameras=1), "num_cameras must be an int >= 2"),
    (dict(num_ids=0), "num_ids must be an int >= 1"),
    (dict(images_per_camera=(3, 2)), "images_per_camera"),
    (dict(cameras_per_id=(2, 9)), "cameras_per_id"),
    (dict(cameras_per_id=1), "cameras_per_id"),
    (dict(image_format="gif"), "image_format"),
    (dict(height=10.5), "height"),
])
def test_synthetic_bad_options(options, match):
    with pytest.raises(DatasetError, match=match):
        synthetic.synthetic_options(**options)


# ----------------------------------------------------------------------------- folder
def test_folder_from_names(tmp_path):
    _touch(tmp_path / "day1", "c2_0001.jpg", "c10_0002.png", "c2_0003.jpg")
    _touch(tmp_path / "day2", "c1_0004.jpg")
    ds = datasets.build("folder", tmp_path)
    assert ds.camera_names == [1, 2, 10]  # numeric order, not text order
    assert _names(ds.train) == [("c10_0002.png", -1, 2), ("c2_0001.jpg", -1, 1),
                                ("c2_0003.jpg", -1, 1), ("c1_0004.jpg", -1, 0)]
    assert not ds.train_labelled and not ds.evaluable and ds.query == []
    assert "  -" in ds.summary().splitlines()[3].replace("|", " ")  # ids unknown


def test_folder_with_pids_splits_and_path_regex(tmp_path):
    for split, names in (("train", ["cam_a/p1_x.jpg", "cam_b/p1_y.jpg"]),
                         ("query", ["cam_a/p5_q.jpg"]), ("gallery", ["cam_b/p5_g.jpg", "cam_c/p0_g.jpg"])):
        for n in names:
            _touch(tmp_path / split / os.path.dirname(n), os.path.basename(n))
    ds = datasets.build("folder", tmp_path, camera_regex=r"^cam_(\w+)/", pid_regex=r"p(\d+)_")
    assert ds.camera_names == ["a", "b", "c"]
    assert _names(ds.train) == [("p1_x.jpg", 1, 0), ("p1_y.jpg", 1, 1)]
    assert _names(ds.query) == [("p5_q.jpg", 5, 0)]
    assert _names(ds.gallery) == [("p5_g.jpg", 5, 1), ("p0_g.jpg", 0, 2)]
    assert ds.train_labelled and ds.evaluable


def test_folder_from_csv(tmp_path):
    _touch(tmp_path / "img", "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    (tmp_path / "train.csv").write_text("path,camid,pid\nimg/a.jpg,3,\nimg/b.jpg,1,\n")
    (tmp_path / "query.csv").write_text("img/c.jpg,north,4\n")
    (tmp_path / "gallery.csv").write_text(f"{tmp_path / 'img' / 'd.jpg'},3,4\n")
    ds = datasets.build("folder", tmp_path / "train.csv", query="query.csv", gallery="gallery.csv")
    # mixed labels sort as text: "1" < "3" < "north"
    assert ds.camera_names == [1, 3, "north"]
    assert _names(ds.train) == [("a.jpg", -1, 1), ("b.jpg", -1, 0)]
    assert _names(ds.query) == [("c.jpg", 4, 2)] and _names(ds.gallery) == [("d.jpg", 4, 1)]
    assert not ds.train_labelled and ds.evaluable


@pytest.mark.parametrize("write, options, match", [
    (lambda r: _touch(r, "c1_a.jpg", "nocam.jpg"), {}, r"camera_regex 'c\(\\d\+\)' does not match .*nocam.jpg"),
    (lambda r: _touch(r, "c1_a.jpg"), dict(camera_regex=r"c\d"), "needs a capture group"),
    (lambda r: _touch(r, "c1_a.jpg"), dict(camera_regex="c(("), "not a valid regular expression"),
    (lambda r: _touch(r, "c1_a.jpg"), dict(pid_regex=r"_(\w)"), "a pid must be an integer"),
    (lambda r: _touch(r, "c1_a.jpg"), dict(query="q.csv"), "give both query and gallery"),
    (lambda r: os.makedirs(r / "empty"), dict(), "train split is empty"),
    (lambda r: (_touch(r, "c1_a.jpg"), (r / "q.csv").write_text("c1_a.jpg\n"),
                (r / "g.csv").write_text("c1_a.jpg,1\n")), dict(query="q.csv", gallery="g.csv"),
     r"q.csv:1: expected 'path,camid\[,pid\]'"),
    (lambda r: (_touch(r, "c1_a.jpg"), (r / "q.csv").write_text("missing.jpg,1,2\n"),
                (r / "g.csv").write_text("c1_a.jpg,1\n")), dict(query="q.csv", gallery="g.csv"),
     "q.csv:1: image .*missing.jpg does not exist"),
    (lambda r: (_touch(r, "c1_a.jpg"), (r / "q.csv").write_text("c1_a.jpg,1,x\n"),
                (r / "g.csv").write_text("c1_a.jpg,1\n")), dict(query="q.csv", gallery="g.csv"),
     "pid 'x' is not an integer"),
    (lambda r: _touch(r, "c1_a.jpg"), dict(query="nope", gallery="nope2"), "missing folder .*nope"),
])
def test_folder_errors(tmp_path, write, options, match):
    root = tmp_path / "data"
    root.mkdir()
    write(root)
    with pytest.raises(DatasetError, match=match):
        datasets.build("folder", root, **options)


# ----------------------------------------------------------------------------- front
def test_build_front(tmp_path):
    assert datasets.names() == ["market1501", "dukemtmc", "msmt17", "synthetic", "folder"]
    with pytest.raises(ValueError, match="unknown dataset 'cuhk03'; choose one of"):
        datasets.build("cuhk03", tmp_path)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['combine_val'\] for dataset 'market1501'"):
        datasets.build("market1501", tmp_path, combine_val=True)
    with pytest.raises(TypeError, match="unknown option"):
        datasets.build("synthetic", tmp_path, num_people=3)
    with pytest.raises(DatasetError, match="market1501 needs root="):
        datasets.build("market1501")
    with pytest.raises(DatasetError, match="missing folder"):
        datasets.build("DUKE", tmp_path / "nowhere")
