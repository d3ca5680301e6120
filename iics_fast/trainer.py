"""The IICS training rounds (DESIGN.md section 1), resumable at every stage boundary.

One round: extract pool5 features -> intra-camera clustering -> stage 1 (one head a camera) ->
features + scores -> inter-camera distance (Eq. 5) -> inter-camera clustering -> stage 2
(CE + batch-hard triplet, PK batches) -> evaluation every `eval_every` rounds.

Every random draw of a stage is seeded from (seed, round, stage), so a run resumed from a
checkpoint replays exactly what an uninterrupted run does (up to nondeterministic GPU kernels).
A checkpoint (`last.pt`) is written atomically after stage 1, after stage 2 and after each round.

Under torchrun (several processes, `iics_fast.distributed`) every rank runs the same loop:
extraction is split across ranks and gathered, clustering runs on rank 0 and its labels are
broadcast, stage 1 gives each rank whole cameras (their heads, their per-camera batch statistics,
merged after every step into what one process would hold), stage 2 splits each P x K batch by
identities (normalised with the whole batch's statistics, the triplet loss mined over the whole
gathered batch), gradients are summed so that a step is the single-process step, and only rank 0
writes files.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed as D
from .data.samplers import CameraBatchSampler, PKBatchSampler
from .data.transforms import ImageDataset, EvalTransform, TrainTransform, load_image
from .pretrain import SOURCE_NAME, source_weights

PHASES = ("extract", "intra_cluster", "stage1", "similarity", "inter_cluster", "stage2",
          "evaluate")


# ----------------------------------------------------------------------------- small helpers

def derive_seed(seed: int, *keys: int) -> int:
    """A seed for one (round, stage) of the run, independent of everything before it."""
    return int(np.random.default_rng([int(seed), *map(int, keys)]).integers(0, 2**62))


def rng_states() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file, fsync, then rename over `path` (never a torn file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def mu_schedule(mu0: float, r: int, rounds: int, power: float) -> float:
    """Poly decay of the Jaccard weight of Eq. 5: mu_r = mu0 * (1 - r / R) ** power."""
    return float(mu0 * (1.0 - r / rounds) ** power)


def pair_counts(a: np.ndarray, b: np.ndarray):
    """Sparse contingency table of two labelings: nonzero cell counts, row and column sums."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    cells = np.unique(ai.astype(np.int64) * (bi.max() + 1) + bi, return_counts=True)[1]
    return cells, np.bincount(ai), np.bincount(bi)


def adjusted_rand_index(a, b) -> float:
    """Adjusted Rand index (Hubert & Arabie) of two labelings."""
    cells, rows, cols = pair_counts(np.asarray(a), np.asarray(b))
    n = len(a)
    comb = lambda x: (x * (x - 1) / 2.0).sum()  # noqa: E731
    sum_cells, sum_rows, sum_cols = comb(cells), comb(rows), comb(cols)
    expected = sum_rows * sum_cols / (n * (n - 1) / 2.0) if n > 1 else 0.0
    top = 0.5 * (sum_rows + sum_cols)
    return 1.0 if top == expected else float((sum_cells - expected) / (top - expected))


def normalized_mutual_info(a, b) -> float:
    """Normalised mutual information with the arithmetic-mean normalisation."""
    a, b = np.asarray(a), np.asarray(b)
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    n = len(a)
    key, cells = np.unique(ai.astype(np.int64) * (bi.max() + 1) + bi, return_counts=True)
    rows, cols = np.bincount(ai), np.bincount(bi)
    r, c = key // (bi.max() + 1), key % (bi.max() + 1)
    mi = (cells / n * np.log(cells * n / (rows[r] * cols[c]))).sum()
    entropy = lambda x: -(x / n * np.log(x / n)).sum()  # noqa: E731
    ha, hb = entropy(rows), entropy(cols)
    return 1.0 if ha + hb == 0 else float(max(0.0, mi) / (0.5 * (ha + hb)))


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al.) on Euclidean distances of `features`."""
    x = features.float()
    sq = (x * x).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * x @ x.t()).clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    hardest_pos = dist.masked_fill(~same, float("-inf")).max(1).values
    hardest_neg = dist.masked_fill(same, float("inf")).min(1).values
    return F.relu(hardest_pos - hardest_neg + margin).mean()


def similarity_histograms(feats: torch.Tensor, pids: np.ndarray, camids: np.ndarray,
                          seed: int, max_images: int = 2000, bins: int = 100) -> dict:
    """Histograms of the cosine similarity for the paper's Figure 3: pairs of the same / a
    different identity from the same / a different camera (a random subset of images). As in
    the paper the similarities are min-max normalised into [0, 1]; the raw range is kept."""
    keep = np.flatnonzero(pids >= 0)
    if len(keep) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_images, replace=False))
    x = F.normalize(feats[keep].float(), dim=1)
    iu = torch.triu_indices(len(keep), len(keep), 1)
    sim = (x @ x.t())[iu[0], iu[1]].numpy()
    p, c = pids[keep], camids[keep]
    same_id = p[iu[0].numpy()] == p[iu[1].numpy()]
    same_cam = c[iu[0].numpy()] == c[iu[1].numpy()]
    lo, hi = float(sim.min()), float(sim.max())
    sim = (sim - lo) / (hi - lo) if hi > lo else np.zeros_like(sim)
    edges = np.linspace(0.0, 1.0, bins + 1)
    groups = {"same id, same camera": same_id & same_cam,
              "same id, other camera": same_id & ~same_cam,
              "other id, same camera": ~same_id & same_cam,
              "other id, other camera": ~same_id & ~same_cam}
    return {"edges": edges.tolist(), "range": [lo, hi],
            **{k: np.histogram(sim[m], edges)[0].tolist() for k, m in groups.items()}}


class _FeatureAndLogits(torch.nn.Module):
    """Backbone + head as one module (one DDP forward in stage 2): (pooled feature, logits)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        f = self.backbone(x)
        return f, self.head(f)


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    """Runs the IICS rounds of one resolved config (a dict, see `iics_fast.train.DEFAULTS`)."""

    def __init__(self, config: dict, resume_state: dict | None = None, hook=None):
        from . import datasets, models  # imported here: building them is the first check

        self.config = dict(config)
        self.cfg = cfg = SimpleNamespace(**config)
        self.hook = hook  # hook(event, round): called after each checkpoint (tests use it)
        self.world, self.rank = D.world_size(), D.rank()
        self.main = self.rank == 0  # the rank that clusters, logs and writes files
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
        if self.world > 1:
            comm = D.comm_device()
            if comm.type != self.device.type:
                raise ValueError(f"--device {cfg.device} does not fit the process group's "
                                 f"{torch.distributed.get_backend()} backend: use --device cuda "
                                 f"(NCCL) or --device cpu (gloo) under torchrun")
            self.device = comm  # under NCCL: this rank's GPU (LOCAL_RANK)
            if cfg.amp == "fp16" and self.device.type == "cuda":
                raise ValueError("--amp fp16 is not supported with several processes (each "
                                 "rank's loss scaler would skip steps on its own); use --amp "
                                 "bf16 or off")
        self.cuda = self.device.type == "cuda"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) \
            if self.cuda else None
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # default workers: the machine's cores shared by the processes torchrun started on it
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.world > 1 else 1
        self.workers = cfg.workers if cfg.workers is not None else (
            min(8, max(1, (os.cpu_count() or 1) // local_procs)) if self.cuda else 0)

        # ---- data, checked before any training
        self.dataset = datasets.build(cfg.dataset, cfg.root, **(cfg.dataset_options or {}))
        train = list(self.dataset.train)
        if not train:
            raise ValueError(f"dataset {cfg.dataset!r} has no training images; check --root")
        load_image(train[0][0])  # an unreadable dataset fails here, not mid-round
        self.paths = [p for p, _, _ in train]
        self.pids = np.array([pid for _, pid, _ in train], dtype=np.int64)
        self.camids = np.array([cam for _, _, cam in train], dtype=np.int64)
        self.cameras = np.unique(self.camids)
        self.has_labels = bool((self.pids >= 0).any()) and len(np.unique(self.pids)) > 1
        if cfg.supervised:
            if not self.has_labels:
                raise ValueError(f"--supervised trains on the true identities, but dataset "
                                 f"{cfg.dataset!r} has no training labels; drop --supervised")
            if (self.pids < 0).any():
                raise ValueError("--supervised: some training images have no identity "
                                 "(pid < 0); remove them or drop --supervised")
            self.true_labels = np.unique(self.pids, return_inverse=True)[1].astype(np.int64)
        CameraBatchSampler(self.camids, cfg.batch_per_camera)  # raises on a too-small camera
        if self.world > len(self.cameras):
            raise ValueError(f"stage 1 gives every process whole cameras, but there are "
                             f"{self.world} processes for {len(self.cameras)} cameras: launch "
                             f"at most {len(self.cameras)} processes")
        if cfg.stages == "both" and self.world > cfg.batch_p:
            raise ValueError(f"stage 2 gives every process whole identities of a batch, but "
                             f"there are {self.world} processes for P={cfg.batch_p}: raise "
                             f"--batch-p or launch fewer processes")
        n = len(train)
        if cfg.stages == "both" and cfg.threshold_inter is None:
            if cfg.k_inter > n:
                raise ValueError(f"--k-inter {cfg.k_inter} asks for more clusters than the "
                                 f"{n} training images; lower it")
            if cfg.k_inter < cfg.batch_p:
                raise ValueError(f"--k-inter {cfg.k_inter} is below P={cfg.batch_p} clusters "
                                 f"a stage-2 batch needs; raise it or lower --batch-p")
        if cfg.k_intra is not None and cfg.k_intra < 1:
            raise ValueError(f"--k-intra must be >= 1, got {cfg.k_intra}")
        self.can_evaluate = bool(self.dataset.query) and bool(self.dataset.gallery)

        # ---- model (a pretrained file that does not fit the arch fails here)
        pretrained = cfg.pretrained
        if pretrained == SOURCE_NAME:  # the synthetic source weights, trained on first use
            pretrained = D.agree(lambda: source_weights(cfg.arch, cfg.height, cfg.width,
                                                        log=self.log), on_main_only=True)
        elif pretrained is not None and not os.path.isfile(pretrained):
            raise ValueError(f"--pretrained {pretrained!r} is not a file (or "
                             f"{SOURCE_NAME!r} for the synthetic source weights)")
        torch.manual_seed(derive_seed(cfg.seed, 0))  # the initial weights depend on the seed only
        self.model = models.build_backbone(arch=cfg.arch, pretrained=pretrained,
                                           init_alpha=cfg.init_alpha, last_stride=cfg.last_stride)
        self.model.to(self.device)
        if self.cuda:
            self.model.to(memory_format=torch.channels_last)
        self.models = models

        # ---- run state (what a checkpoint holds)
        self.progress = {"round": 0, "done": None}  # done: None | "stage1" | "stage2" | "round"
        self.metrics: list[dict] = []
        self.row: dict = {}
        self.heads_state = None
        self.intra_labels = self.inter_labels = None
        self.best = {"rank1": -1.0, "round": None}
        self.sim_hists: dict = {}
        self.initial_eval: dict | None = None
        if resume_state is not None:
            self._load_state(resume_state)
        os.makedirs(cfg.out, exist_ok=True)

    # ------------------------------------------------------------------ checkpointing

    def _state(self) -> dict:
        return {"config": self.config, "progress": dict(self.progress),
                "model": self.model.state_dict(), "heads": self.heads_state,
                "intra_labels": self.intra_labels, "inter_labels": self.inter_labels,
                "metrics": self.metrics, "row": self.row, "best": self.best,
                "sim_hists": self.sim_hists, "initial_eval": self.initial_eval,
                "rng": rng_states()}

    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.progress, self.metrics, self.row = state["progress"], state["metrics"], state["row"]
        self.heads_state = state["heads"]
        self.intra_labels, self.inter_labels = state["intra_labels"], state["inter_labels"]
        self.best, self.sim_hists = state["best"], state["sim_hists"]
        self.initial_eval = state["initial_eval"]
        set_rng_states(state["rng"])

    def _checkpoint(self, done: str | None, r: int) -> None:
        self.progress = {"round": r, "done": done}
        if self.main:
            atomic_save(self._state(), os.path.join(self.cfg.out, "last.pt"))
        D.barrier()  # no rank moves on (or is stopped) before the checkpoint is on disk
        if self.hook is not None:
            self.hook(done or "start", r)

    # ------------------------------------------------------------------ building blocks

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.cuda else x

    def _bar(self, iterable, desc, total=None):
        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                    disable=not (self.cfg.progress and self.main))

    @torch.no_grad()
    def extract(self, items, heads=None, desc="extract", to="all"):
        """Flip-averaged pool5 features (eval mode) and, given heads, the scores
        s = concat_c softmax(head_c(f)). Returns float32 CPU tensors (features, scores|None).
        Under several processes each rank extracts its contiguous share of `items` and the
        shares are gathered in order, to every rank (to="all") or to rank 0 (to="main"; the
        other ranks get (None, None))."""
        self.model.eval()
        part = D.shard_indices(len(items), self.rank, self.world)
        loader = DataLoader(ImageDataset(items[part.start:part.stop],
                                         EvalTransform(self.cfg.height, self.cfg.width)),
                            batch_size=self.cfg.batch_extract, shuffle=False,
                            num_workers=self.workers, pin_memory=self.cuda)
        feats = [torch.zeros(0, self.model.out_dim)]
        scores = [torch.zeros(0, sum(h.classifier.out_features for h in heads))] if heads else []
        for x, *_ in self._bar(loader, desc):
            x = self._to_device(x)
            with self._autocast():
                f = (self.model(x).float() + self.model(x.flip(3)).float()) / 2
                if heads is not None:
                    scores.append(torch.cat([F.softmax(h(f).float(), 1) for h in heads], 1).cpu())
            feats.append(f.float().cpu())
        feats, scores = torch.cat(feats), (torch.cat(scores) if heads is not None else None)
        if self.world == 1:
            return feats, scores
        dst = None if to == "all" else 0
        gather = lambda t: None if t is None else D.all_gather_rows(  # noqa: E731
            t.to(self.device), dst=dst)
        feats, scores = gather(feats), gather(scores)
        return (None if feats is None else feats.cpu()), (None if scores is None else scores.cpu())

    def _cluster(self, dist: np.ndarray, k: int | None, quantile: float | None) -> np.ndarray:
        """Average-linkage clustering of a float32 distance, square (upper triangle read) or
        condensed, after the optional k-reciprocal re-ranking, into k clusters or by the
        distance at a quantile. Re-ranking and clustering work in place on `dist`."""
        from . import cluster
        cfg = self.cfg
        if cfg.similarity == "rerank":
            from . import rerank
            rerank.k_reciprocal(dist, k1=cfg.rerank_k1, k2=cfg.rerank_k2,
                                lambda_value=cfg.rerank_lambda, out=dist)
        if quantile is None:
            return np.asarray(cluster.agglomerative(dist, n_clusters=k, inplace=True))
        upper = dist[np.triu_indices(len(dist), 1)] if dist.ndim == 2 else dist
        threshold = cluster.quantile_threshold(upper, quantile)
        return np.asarray(cluster.agglomerative(dist, distance_threshold=threshold, inplace=True))

    def intra_cluster(self, feats: torch.Tensor) -> np.ndarray:
        """Per camera: 1 - cos on L2-normalised features, average linkage into k_intra clusters
        (a camera with fewer images gets max(1, n_c // 2)). Labels are 0-based per camera."""
        labels = np.empty(len(feats), dtype=np.int64)
        for c in self._bar(self.cameras, "intra clustering"):
            idx = np.flatnonzero(self.camids == c)
            x = F.normalize(feats[idx], dim=1)
            dist = (1.0 - x @ x.t()).clamp_min_(0.0).fill_diagonal_(0.0).numpy()
            k = None
            if self.cfg.threshold_intra is None:
                k = self.cfg.k_intra if len(idx) >= self.cfg.k_intra else max(1, len(idx) // 2)
            labels[idx] = self._cluster(dist, k, self.cfg.threshold_intra) if len(idx) > 1 else 0
        return labels

    def _sgd(self, groups):
        return torch.optim.SGD(groups, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)

    def _backbone_params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def _ddp(self, module):
        """`module` wrapped in DistributedDataParallel with summed gradients (each rank weights
        its loss so that the sum is the single-process gradient) and per-rank buffers (the
        trainer merges the running statistics itself); `module` itself in one process."""
        if self.world == 1:
            return module
        DDP = torch.nn.parallel.DistributedDataParallel
        # newer torch renames broadcast_buffers; both keep buffers out of every forward
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DDP).parameters else {"broadcast_buffers": False})
        ddp = DDP(module, device_ids=[self.device.index] if self.cuda else None, **no_buffer_sync)
        ddp.register_comm_hook(None, D.sum_gradients_hook)
        return ddp

    def stage1(self, heads, seed: int) -> dict:
        """Intra-camera training: every iteration 8 images of every camera, each camera
        forwarded on its own (per-camera batch statistics) through its head; the C
        cross-entropy losses are summed and one SGD step is taken. Under several processes a
        rank runs the cameras `group_share(C)` (only their heads get gradients here; each head
        is copied from its rank to all at the end) and the summed gradients and merged running
        statistics make each step the single-process step."""
        cfg = self.cfg
        items = list(zip(self.paths, self.intra_labels, self.camids))
        sampler = CameraBatchSampler(self.camids, cfg.batch_per_camera, seed=seed)
        n_cams = len(heads)
        own = D.group_share(n_cams, self.rank, self.world)
        net, sync = self.model, None
        if self.world > 1:
            sampler = D.ShardedBatchSampler(sampler, group_size=cfg.batch_per_camera)
            net = self._ddp(self.model)
            sync = D.SequentialStatsSync(self.model, own.start, len(own), n_cams)
        loader = DataLoader(ImageDataset(items, TrainTransform(cfg.height, cfg.width)),
                            batch_sampler=sampler, num_workers=self.workers,
                            pin_memory=self.cuda)
        opt = self._sgd([
            {"params": self._backbone_params(), "lr": cfg.lr_intra},
            {"params": [p for h in heads for p in h.parameters() if p.requires_grad],
             "lr": cfg.lr_intra_head}])
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.model.train()
        heads.train()
        k, losses, correct, seen = cfg.batch_per_camera, [], 0, 0
        for epoch in range(cfg.epochs_intra):
            sampler.set_epoch(epoch)
            bar = self._bar(loader, f"stage 1 epoch {epoch + 1}/{cfg.epochs_intra}")
            for x, y, _, _ in bar:
                opt.zero_grad(set_to_none=True)
                x, y = self._to_device(x), y.to(self.device)
                total = 0.0
                if sync is not None:
                    sync.snapshot()
                for j, ci in enumerate(own):
                    xs, ys = x[j * k:(j + 1) * k], y[j * k:(j + 1) * k]
                    # DDP reduces the gradients in the backward of a rank's last camera only
                    last = j == len(own) - 1
                    with contextlib.nullcontext() if net is self.model or last else net.no_sync():
                        with self._autocast():
                            logits = heads[ci](net(xs)).float()
                        loss = F.cross_entropy(logits, ys)
                        scaler.scale(loss).backward()  # summing C losses = accumulating C grads
                    total += loss.item()
                    correct += int((logits.argmax(1) == ys).sum())
                    seen += len(ys)
                if sync is not None:
                    sync.merge()
                scaler.step(opt)
                scaler.update()
                losses.append(total)
                bar.set_postfix(loss=f"{total:.3f}")
        del net
        for ci in range(n_cams):  # every head from the rank that trained it
            D.broadcast_module(heads[ci], src=next(
                r for r in range(self.world) if ci in D.group_share(n_cams, r, self.world)))
        # ranks' sums of their cameras' losses, added per iteration
        parts = D.all_gather_object((float(np.sum(losses)), correct, seen))
        iters = len(losses)
        return {"loss": sum(p[0] for p in parts) / iters if iters else float("nan"),
                "acc": sum(p[1] for p in parts) / max(1, sum(p[2] for p in parts)),
                "iterations": iters}

    def inter_distance(self, feats, scores, r: int) -> np.ndarray:
        """Condensed inter-camera distance of Eq. 5 (or the ablations: features alone with
        `feature`, 1 - J alone with `jaccard`), mu decayed over the rounds."""
        from . import similarity
        mu = mu_schedule(self.cfg.mu, r, self.cfg.rounds, self.cfg.mu_power)
        self.row["mu"] = mu
        mode = self.cfg.inter_similarity
        if self.world > 1:  # each rank builds its rows, rank 0 receives them (None elsewhere)
            d = D.sharded_inter_camera_distance(feats.to(self.device), scores.to(self.device),
                                                self.camids, mu, mode=mode, dst=0)
            return None if d is None else d.cpu().numpy()
        d = similarity.inter_camera_distance(feats, scores, self.camids, mu, out="condensed",
                                             mode=mode)
        return d.cpu().numpy()

    def stage2(self, head, seed: int, steps: int | None = None) -> dict:
        """Inter-camera training: PK batches, CE on the head + batch-hard triplet on the
        pre-BN feature. Under several processes a rank takes whole identities of each batch
        (`group_share(P)`), weights its mean CE by its share of the batch, and mines the
        triplet loss over the whole gathered batch; the norm layers use the whole batch's
        statistics (`synced_batch_stats`), or with sync_bn off the rank's own (the running
        statistics are then averaged over the ranks at the end)."""
        cfg = self.cfg
        items = list(zip(self.paths, self.inter_labels, self.camids))
        sampler = PKBatchSampler(self.inter_labels, cfg.batch_p, cfg.batch_k, seed=seed)
        if self.world > 1:
            sampler = D.ShardedBatchSampler(sampler, group_size=cfg.batch_k)
        both = _FeatureAndLogits(self.model, head)
        net = self._ddp(both)
        batch = cfg.batch_p * cfg.batch_k
        synced = D.synced_batch_stats(both) if cfg.sync_bn else contextlib.nullcontext()
        loader = DataLoader(ImageDataset(items, TrainTransform(cfg.height, cfg.width)),
                            batch_sampler=sampler, num_workers=self.workers,
                            pin_memory=self.cuda)
        opt = self._sgd([
            {"params": self._backbone_params(), "lr": cfg.lr_inter},
            {"params": [p for p in head.parameters() if p.requires_grad],
             "lr": cfg.lr_inter_head}])
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.model.train()
        head.train()
        ce_all, tri_all, correct, seen = [], [], 0, 0
        with synced:
            epochs = cfg.epochs_inter if steps is None else -(-steps // max(1, len(sampler)))
            for epoch in range(epochs):
                sampler.set_epoch(epoch)
                bar = self._bar(loader, f"stage 2 epoch {epoch + 1}/{epochs}")
                for x, y, _, _ in bar:
                    if steps is not None and len(ce_all) == steps:
                        break
                    x, y = self._to_device(x), y.to(self.device)
                    with self._autocast():
                        f, logits = net(x)
                    logits = logits.float()
                    ce = F.cross_entropy(logits, y)
                    share = len(y) / batch  # 1 in one process
                    if self.world > 1:
                        f, y_all = D.gather_for_loss(f), D.all_gather_rows(y)
                    else:
                        y_all = y
                    tri = batch_hard_triplet(f, y_all, cfg.margin)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(ce * share + cfg.triplet_weight * tri).backward()
                    scaler.step(opt)
                    scaler.update()
                    ce_all.append(ce.item() * share)
                    tri_all.append(tri.item())
                    correct += int((logits.argmax(1) == y).sum())
                    seen += len(y)
                    bar.set_postfix(ce=f"{ce.item():.3f}", tri=f"{tri.item():.3f}")
        del net
        if not cfg.sync_bn:  # synchronised statistics already agree on every rank
            D.average_running_stats(self.model)
        # per iteration the ranks' share-weighted CE add up to the batch's mean CE; the
        # triplet loss is the same on every rank
        parts = D.all_gather_object((float(np.sum(ce_all)), correct, seen))
        iters = len(ce_all)
        return {"loss_ce": sum(p[0] for p in parts) / iters if iters else float("nan"),
                "loss_triplet": float(np.mean(tri_all)) if tri_all else float("nan"),
                "acc": sum(p[1] for p in parts) / max(1, sum(p[2] for p in parts)),
                "iterations": iters}

    def supervised_steps(self) -> int:
        """SGD steps of one IICS round on this data: stage 1's (known in advance) plus
        stage 2's on the true identities (clusters as many as the ids, so about what stage 2
        takes on the inter-camera clusters)."""
        cfg = self.cfg
        steps = cfg.epochs_intra * len(CameraBatchSampler(self.camids, cfg.batch_per_camera))
        if cfg.stages == "both":
            steps += cfg.epochs_inter * len(PKBatchSampler(self.true_labels, cfg.batch_p,
                                                           cfg.batch_k))
        return steps

    def _supervised_round(self, r: int) -> dict:
        """One round of the supervised upper bound: the stage-2 losses on the true training
        identities, as many SGD steps as an IICS round takes; one head kept over the rounds."""
        self.inter_labels = self.true_labels
        self.row["inter_clusters"] = n = int(self.true_labels.max()) + 1
        self.row["inter_quality"] = {"ari": 1.0, "nmi": 1.0}
        self.row["mu"] = float("nan")
        torch.manual_seed(derive_seed(self.cfg.seed, r, 2))
        head = self.models.ClassifierHead(self.model.out_dim, n).to(self.device)
        if self.heads_state is not None:
            head.load_state_dict(self.heads_state)
        result = self.stage2(head, derive_seed(self.cfg.seed, r, 2), steps=self.supervised_steps())
        self.heads_state = head.state_dict()
        return result

    def evaluate(self, figure: str | None = None) -> dict:
        """Flip-averaged, L2-normalised features, cosine distance, Market-1501 protocol; with
        `figure` (a file name in the run folder) also the ranked lists of a few queries."""
        from . import evaluation
        q, g = self.dataset.query, self.dataset.gallery
        qf, _ = self.extract(q, desc="extract query", to="main")
        gf, _ = self.extract(g, desc="extract gallery", to="main")
        if not self.main:
            return D.broadcast_object(None)
        qf, gf = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
        if figure is not None:
            from .plots import plot_ranked_lists, ranked_lists
            plot_ranked_lists(ranked_lists(qf, gf, q, g, seed=self.cfg.seed),
                              os.path.join(self.cfg.out, figure),
                              title=f"{self.cfg.dataset}: {figure[:-4].replace('_', ' ')} training")
        cmc, mAP = evaluation.evaluate_features(
            qf, gf, np.array([x[1] for x in q]), np.array([x[1] for x in g]),
            np.array([x[2] for x in q]), np.array([x[2] for x in g]))
        cmc = np.asarray(cmc)
        rank = lambda k: float(cmc[min(k, len(cmc)) - 1])  # noqa: E731
        return D.broadcast_object(
            {"mAP": float(mAP), "rank1": rank(1), "rank5": rank(5), "rank10": rank(10)})

    def _quality(self, labels: np.ndarray, truth: np.ndarray) -> dict:
        keep = self.pids >= 0
        return {"ari": adjusted_rand_index(labels[keep], truth[keep]),
                "nmi": normalized_mutual_info(labels[keep], truth[keep])}

    def _hist(self, key: str, feats: torch.Tensor, r: int) -> None:
        if self.has_labels and self.main:
            self.sim_hists[key] = similarity_histograms(
                feats, self.pids, self.camids, derive_seed(self.cfg.seed, r, 9))

    # ------------------------------------------------------------------ the round loop

    def run(self) -> list[dict]:
        cfg, models, log = self.cfg, self.models, self.log
        start = self.progress["round"] + (self.progress["done"] == "round")
        fresh = D.agree(lambda: not os.path.exists(os.path.join(cfg.out, "last.pt")),
                        on_main_only=True)  # rank 0's disk decides
        if fresh:
            if self.can_evaluate and cfg.eval_every > 0:
                # the starting point the rounds improve on
                self.initial_eval = self.evaluate(figure="ranked_before.png")
                log(self._describe_eval("before training", self.initial_eval))
            self._checkpoint(None, 0)  # so that a run killed in its first round can resume
        for r in range(start, cfg.rounds):
            done = self.progress["done"] if self.progress["round"] == r else None
            if done is None:
                self.row = {"round": r, "time": {}}
            t = self.row["time"]
            log(f"---- round {r + 1}/{cfg.rounds}")

            if done is None and cfg.supervised:  # the upper bound: stage 2 on the true ids
                tic = time.perf_counter()
                self.row["stage2"] = self._supervised_round(r)
                t["stage2"] = time.perf_counter() - tic
                log(self._describe_stage2())
                self._checkpoint("stage2", r)
                done = "stage2"

            if done is None:  # extract -> intra-camera clustering -> stage 1
                tic = time.perf_counter()
                feats, _ = self.extract(list(zip(self.paths, self.pids, self.camids)), to="main")
                t["extract"] = time.perf_counter() - tic
                self._hist(f"round {r} start", feats, r)

                tic = time.perf_counter()
                self.intra_labels = D.broadcast_object(
                    self.intra_cluster(feats) if self.main else None)
                del feats
                t["intra_cluster"] = time.perf_counter() - tic
                counts = [int(self.intra_labels[self.camids == c].max()) + 1
                          for c in self.cameras]
                self.row["intra_clusters"] = counts
                if self.has_labels:
                    truth = self.pids * (int(self.cameras.max()) + 1) + self.camids
                    self.row["intra_quality"] = self._quality(
                        self.intra_labels * (int(self.cameras.max()) + 1) + self.camids, truth)

                tic = time.perf_counter()
                torch.manual_seed(derive_seed(cfg.seed, r, 1))
                heads = torch.nn.ModuleList(
                    [models.ClassifierHead(self.model.out_dim, k) for k in counts]).to(self.device)
                self.row["stage1"] = self.stage1(heads, derive_seed(cfg.seed, r, 1))
                t["stage1"] = time.perf_counter() - tic
                self.heads_state = heads.state_dict()
                self.row["stage1"]["alpha_mean"] = float(np.mean(
                    [float(a.detach().clamp(0, 1).mean()) for a in models.aibn_alphas(self.model)]
                    or [float("nan")]))
                log(self._describe_stage1())
                self._checkpoint("stage1", r)
                done = "stage1"

            if done == "stage1" and cfg.stages == "both":  # inter-camera clustering -> stage 2
                heads = torch.nn.ModuleList(
                    [models.ClassifierHead(self.model.out_dim, k)
                     for k in self.row["intra_clusters"]]).to(self.device)
                heads.load_state_dict(self.heads_state)
                heads.eval()
                tic = time.perf_counter()
                feats, scores = self.extract(list(zip(self.paths, self.pids, self.camids)),
                                             heads=heads, desc="extract + scores")
                t["extract"] += time.perf_counter() - tic
                self._hist(f"round {r} after stage 1", feats, r)

                tic = time.perf_counter()
                dist = self.inter_distance(feats, scores, r)
                del feats, scores
                t["similarity"] = time.perf_counter() - tic

                tic = time.perf_counter()
                k = None if cfg.threshold_inter is not None else cfg.k_inter
                self.inter_labels = D.broadcast_object(
                    self._cluster(dist, k, cfg.threshold_inter) if self.main else None)
                del dist
                t["inter_cluster"] = time.perf_counter() - tic
                n_inter = int(self.inter_labels.max()) + 1
                self.row["inter_clusters"] = n_inter
                if self.has_labels:
                    self.row["inter_quality"] = self._quality(self.inter_labels, self.pids)

                tic = time.perf_counter()
                torch.manual_seed(derive_seed(cfg.seed, r, 2))
                head = models.ClassifierHead(self.model.out_dim, n_inter).to(self.device)
                self.row["stage2"] = self.stage2(head, derive_seed(cfg.seed, r, 2))
                t["stage2"] = time.perf_counter() - tic
                log(self._describe_stage2())
                self.heads_state = None
                self._checkpoint("stage2", r)

            last = r == cfg.rounds - 1
            if self.can_evaluate and cfg.eval_every > 0 and ((r + 1) % cfg.eval_every == 0 or last):
                tic = time.perf_counter()
                result = self.evaluate(figure="ranked_after.png" if last else None)
                t["evaluate"] = time.perf_counter() - tic
                self.row["eval"] = result
                log(self._describe_eval("  eval", result))
                # best by rank-1, ties broken by mAP
                if (result["rank1"], result["mAP"]) > (self.best["rank1"],
                                                       self.best.get("mAP", -1.0)):
                    self.best = {"rank1": result["rank1"], "mAP": result["mAP"], "round": r}
                    if self.main:
                            atomic_save({"config": self.config, "round": r, "model":
                                     self.model.state_dict(), "eval": result},
                                    os.path.join(cfg.out, "best.pt"))
            log("  time: " + "  ".join(f"{k} {v:.1f}s" for k, v in t.items()))
            self.metrics.append(self.row)
            self._write_metrics()
            self._checkpoint("round", r)
        return self.metrics

    # ------------------------------------------------------------------ reporting

    def log(self, msg: str) -> None:
        if self.cfg.verbose and self.main:
            tqdm.write(msg)

    @staticmethod
    def _describe_eval(what: str, e: dict) -> str:
        return (f"{what}: mAP {e['mAP']:.1%}  rank-1 {e['rank1']:.1%}  rank-5 {e['rank5']:.1%}"
                f"  rank-10 {e['rank10']:.1%}")

    def _describe_stage1(self) -> str:
        row, s = self.row, self.row["stage1"]
        q = row.get("intra_quality")
        qual = f"  ARI {q['ari']:.3f} NMI {q['nmi']:.3f}" if q else ""
        return (f"  intra: {sum(row['intra_clusters'])} clusters over {len(self.cameras)} "
                f"cameras{qual} | stage 1: {s['iterations']} it, loss {s['loss']:.3f}, "
                f"acc {s['acc']:.1%}, alpha {s['alpha_mean']:.3f}")

    def _describe_stage2(self) -> str:
        row, s = self.row, self.row["stage2"]
        q = row.get("inter_quality")
        qual = f"  ARI {q['ari']:.3f} NMI {q['nmi']:.3f}" if q else ""
        return (f"  inter: {row['inter_clusters']} clusters (mu {row['mu']:.4f}){qual} | "
                f"stage 2: {s['iterations']} it, CE {s['loss_ce']:.3f}, triplet "
                f"{s['loss_triplet']:.3f}, acc {s['acc']:.1%}")

    def _write_metrics(self) -> None:
        if not self.main:
            return
        out = self.cfg.out
        atomic_write_text("".join(json.dumps(row) + "\n" for row in self.metrics),
                          os.path.join(out, "metrics.jsonl"))
        from .plots import plot_metrics, plot_similarity
        plot_metrics(self.metrics, os.path.join(out, "metrics.png"), self.initial_eval)
        if self.sim_hists:
            plot_similarity(self.sim_hists, os.path.join(out, "similarity.png"))


__all__ = ["Trainer", "PHASES", "derive_seed", "adjusted_rand_index", "normalized_mutual_info",
           "batch_hard_triplet", "mu_schedule", "atomic_save", "similarity_histograms"]