"""What the training loop stands on: the checks of a config before any training, the model, the
data, feature extraction, the one-process / several-process differences (each in one helper
here), checkpoint writing and the log lines. `iics_fast.trainer.Trainer` holds the loop itself."""
from __future__ import annotations

import inspect
import json
import os
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed as D, norm_sync
from .checkpoint import atomic_save, derive_seed
from .data.samplers import CameraBatchSampler, ShardedBatchSampler
from .data.transforms import EvalTransform, ImageDataset, TrainTransform, load_image
from .pretrain import SOURCE_NAME, source_weights


class TrainerBase:
    """Set-up and helpers of `Trainer`; the settings are `self.cfg` (one resolved config)."""

    def __init__(self, config: dict, resume_state: dict | None = None, hook=None):
        from . import models  # imported here: building the model is the last check
        from .config import check_config

        check_config(config)  # every option, before anything is read
        self.cfg = cfg = SimpleNamespace(**config)
        self.hook = hook  # hook(event, round): called after each checkpoint (tests use it)
        self.folder = None  # the RunFolder rank 0 writes into (iics_fast.rundir)
        self.world, self.rank = D.world_size(), D.rank()
        self.main = self.rank == 0  # the rank that clusters, logs and writes files
        self.device = self._pick_device()
        self.cuda = self.device.type == "cuda"
        self.amp_dtype = models.amp_dtype(cfg.amp, self.device)
        if self.cuda:
            torch.backends.cudnn.benchmark = True
            # --amp off is the reference's float32: cuDNN would otherwise run the convolutions
            # in TF32 on Ampere and later GPUs (matrix products are float32 by default)
            torch.backends.cudnn.allow_tf32 = cfg.amp != "off"
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # default workers: the machine's cores shared by the processes torchrun started on it
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.world > 1 else 1
        self.workers = cfg.workers if cfg.workers is not None else (
            min(8, max(1, (os.cpu_count() or 1) // local_procs)) if self.cuda else 0)
        self.models = models
        self._load_data()
        self._check_config(saved_mode=(resume_state or {}).get("inter_mode"))
        self.rerank = None if cfg.similarity != "rerank" else {
            "k1": cfg.rerank_k1, "k2": cfg.rerank_k2, "lambda_value": cfg.rerank_lambda}
        self.model = self._build_model()
        # run state (what a checkpoint holds)
        self.progress = {"round": 0, "done": None}  # done: None | "stage1" | "stage2" | "round"
        self.metrics: list[dict] = []
        self.row: dict = {}
        self.heads_state = None
        self.intra_labels = self.inter_labels = None
        self.best = {"rank1": -1.0, "round": None}
        self.sim_hists: dict = {}
        self.initial_eval: dict | None = None
        self.resumed = resume_state is not None
        if self.resumed:
            if resume_state.get("dataset_fingerprint") not in (None, self.fingerprint):
                raise ValueError(
                    f"--resume: the training set under --root {cfg.root} is not the one the run "
                    f"was trained on ({len(self.paths)} images now, "
                    f"{resume_state.get('dataset_size', '?')} then, or other files): point "
                    f"--root at the run's dataset")
            self.load_state(resume_state)

    @property
    def config(self) -> dict:
        """The resolved config as a dict (what config.json and the checkpoints hold)."""
        return dict(vars(self.cfg))

    # ------------------------------------------------------------------ checks before training

    def _pick_device(self) -> torch.device:
        cfg, device = self.cfg, torch.device(self.cfg.device)  # checked by check_config
        if self.world == 1:
            return device
        comm = D.comm_device()
        if comm.type != device.type:
            raise ValueError(f"--device {cfg.device} does not fit the process group's "
                             f"{torch.distributed.get_backend()} backend: use --device cuda "
                             f"(NCCL) or --device cpu (gloo) under torchrun")
        if cfg.amp == "fp16" and comm.type == "cuda":
            raise ValueError("--amp fp16 is not supported with several processes (each rank's "
                             "loss scaler would skip steps on its own); use --amp bf16 or off")
        return comm  # under NCCL: this rank's GPU (LOCAL_RANK)

    def _load_data(self) -> None:
        from . import datasets

        cfg = self.cfg
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
        if cfg.supervised and (not self.has_labels or (self.pids < 0).any()):
            raise ValueError(f"--supervised trains on the true identities, but dataset "
                             f"{cfg.dataset!r} has training images without one; drop "
                             f"--supervised")
        self.can_evaluate = (self.dataset.evaluable and bool(self.dataset.query)
                             and bool(self.dataset.gallery))
        self.camera_name = self.dataset.camera_name  # cameras as the user names them
        self.fingerprint = self.dataset.fingerprint()

    def _check_config(self, saved_mode: str | None = None) -> None:
        cfg, n = self.cfg, len(self.paths)
        if cfg.stages == "both" and len(self.cameras) == 1:
            raise ValueError(f"the training set has one camera ({self.camera_name(self.cameras[0])})"
                             f": the inter-camera stage associates images across cameras and has "
                             f"nothing to do; train with --stages intra, or add other cameras")
        # raises on a too-small camera
        CameraBatchSampler(self.camids, cfg.batch_per_camera, camera_name=self.camera_name)
        if self.world > len(self.cameras):
            raise ValueError(f"stage 1 gives every process whole cameras, but there are "
                             f"{self.world} processes for {len(self.cameras)} cameras: launch "
                             f"at most {len(self.cameras)} processes")
        if cfg.stages == "both" and self.world > cfg.batch_p:
            raise ValueError(f"stage 2 gives every process whole identities of a batch, but "
                             f"there are {self.world} processes for P={cfg.batch_p}: raise "
                             f"--batch-p or launch fewer processes")
        if cfg.stages == "both" and cfg.threshold_inter is None:
            if cfg.k_inter > n:
                raise ValueError(f"--k-inter {cfg.k_inter} asks for more clusters than the "
                                 f"{n} training images; lower it")
            if cfg.k_inter < cfg.batch_p:
                raise ValueError(f"--k-inter {cfg.k_inter} is below P={cfg.batch_p} clusters "
                                 f"a stage-2 batch needs; raise it or lower --batch-p")
        self.inter_mode = self._inter_mode(saved_mode)
        self._check_memory()

    def _heads(self) -> int:
        """Intra-camera clusters over all cameras: the width of the stage-2 scores."""
        from .pipeline import cluster_count

        return sum(cluster_count(int(c), self.cfg.k_intra) for c in np.bincount(self.camids) if c)

    def _inter_mode(self, saved_mode: str | None = None) -> str:
        """--inter-mode resolved ("auto": sparse when the dense round's arrays would not fit the
        memory measured, said in the log; a resumed run keeps the mode it chose first, saved in
        its checkpoint); the sparse round's limits checked."""
        from . import sparse

        cfg = self.cfg
        log = self.log if self.main else (lambda m: None)
        if cfg.inter_mode == "auto" and saved_mode in ("dense", "sparse"):
            mode = saved_mode
            log(f"--inter-mode auto: {mode} round, as the run chose when it started")
        else:
            mode = sparse.choose_inter_mode(cfg.inter_mode, len(self.paths),
                                            self.models.feature_dim(cfg.arch), self._heads(),
                                            log=log)
        refused = self._sparse_refusal()
        if mode == "sparse" and cfg.stages == "both" and refused:
            raise ValueError(refused)
        return mode

    def _sparse_refusal(self) -> str | None:
        """Why the sparse inter-camera round cannot run these settings (None: it can)."""
        cfg = self.cfg
        if cfg.threshold_inter is not None:
            return ("--inter-mode sparse clusters into --k-inter clusters; the threshold variant "
                    "(--threshold-inter) needs --inter-mode dense")
        if cfg.inter_similarity == "jaccard":
            return ("--inter-similarity jaccard (1 - J over all pairs) needs --inter-mode dense; "
                    "the sparse round runs eq5 and feature")
        return None

    def _check_memory(self) -> None:
        """A round's largest arrays against the memory available, before any work: the
        condensed intra-camera distance of the largest camera, and on rank 0 the condensed
        inter-camera distance beside the features and scores."""
        from . import condensed, memory, sparse

        cfg, n = self.cfg, len(self.paths)
        largest = int(np.bincount(self.camids).max())
        dim = self.models.feature_dim(cfg.arch)
        need = 4 * condensed.size(largest) + 4 * largest * dim
        what = f"intra-camera clustering of the largest camera ({largest} images)"
        way_out = memory.FEWER_IMAGES
        dense = self.inter_mode != "sparse"  # the sparse round has no N x N
        if cfg.stages == "both" and self.main and dense:
            inter = sparse.dense_round_bytes(n, dim, self._heads())
            if inter > need:
                need, what = inter, (
                    f"the inter-camera distance of the N = {n} training images "
                    f"({memory.format_bytes(4 * condensed.size(n))} condensed, with the "
                    f"features and scores)")
                if self._sparse_refusal() is None:
                    way_out += memory.SPARSE_ROUND
        memory.require(need, f"one training round: {what}", way_out=way_out)

    def _build_model(self):
        """The backbone (a pretrained file that does not fit the arch fails here)."""
        cfg, pretrained = self.cfg, self.cfg.pretrained
        if pretrained == SOURCE_NAME:  # the synthetic source weights, trained on first use
            pretrained = D.agree(lambda: source_weights(cfg.arch, cfg.height, cfg.width,
                                                        log=self.log), on_main_only=True)
        elif pretrained is not None and not os.path.isfile(pretrained):
            raise ValueError(f"--pretrained {pretrained!r} is not a file (or {SOURCE_NAME!r} "
                             f"for the synthetic source weights)")
        torch.manual_seed(derive_seed(cfg.seed, 0))  # the initial weights depend on the seed only
        model = self.models.build_backbone(arch=cfg.arch, pretrained=pretrained,
                                           init_alpha=cfg.init_alpha, last_stride=cfg.last_stride)
        model.to(self.device)
        if self.cuda:
            model.to(memory_format=torch.channels_last)
        return model

    # ------------------------------------------------------------------ one process or several

    def shard(self, sampler, group_size: int):
        """This rank's part of every batch of `sampler` (the sampler itself in one process)."""
        return sampler if self.world == 1 else ShardedBatchSampler(sampler, group_size=group_size)

    def ddp(self, module):
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

    def stats_sync(self, own: range, n_cams: int):
        """Stage 1's merge of the ranks' running statistics after every step (nothing to merge
        in one process)."""
        if self.world == 1:
            return _NoSync()
        return norm_sync.SequentialStatsSync(self.model, own.start, len(own), n_cams)

    def gather_batch(self, f: torch.Tensor, y: torch.Tensor):
        """(features, labels) of the whole batch over the ranks, features differentiable."""
        if self.world == 1:
            return f, y
        return D.gather_for_loss(f), D.all_gather_rows(y)

    def gather_rows(self, t: torch.Tensor | None, to: str):
        """Every rank's rows of `t` in rank order, on every rank (to="all") or rank 0 only
        (to="main", None elsewhere); CPU tensors; `t` itself in one process."""
        if t is None or self.world == 1:
            return t
        t = D.all_gather_rows(t.to(self.device), dst=None if to == "all" else 0)
        return None if t is None else t.cpu()

    def summed(self, key: str, losses: list, correct: int, seen: int) -> dict:
        """A stage's mean loss per iteration (the ranks' parts of each iteration added), its
        accuracy over every rank's samples, and its iteration count."""
        parts = D.all_gather_object((float(np.sum(losses)), correct, seen))
        iters = len(losses)
        return {key: sum(p[0] for p in parts) / iters if iters else float("nan"),
                "acc": sum(p[1] for p in parts) / max(1, sum(p[2] for p in parts)),
                "iterations": iters}

    def set_out(self, out: str) -> None:
        """The run folder's final name (a default --out made unique when it was claimed)."""
        self.cfg.out = out

    def take_folder(self) -> None:
        """Rank 0 locks the run folder when the caller has not (the trainer used as a
        library); `iics_fast.train` hands it over already locked."""
        if self.main and self.folder is None:
            from .rundir import RunFolder

            self.folder = RunFolder(self.cfg.out, resume=self.resumed).acquire()

    def checkpoint(self, done: str | None, r: int, event: str | None = None) -> None:
        """Writes `last.pt` (rank 0; the one before becomes `previous.pt`) after `done` of
        round r; every rank waits for it."""
        self.progress = {"round": r, "done": done}
        if self.main:
            self.folder.save_checkpoint(self.state())
        D.barrier()  # no rank moves on (or is stopped) before the checkpoint is on disk
        if self.hook is not None:
            self.hook(event or done or "start", r)

    def save_best(self, r: int, result: dict) -> None:
        if self.main:
            atomic_save({"config": self.config, "round": r, "model": self.model.state_dict(),
                         "eval": result}, self.folder.path("best.pt"))

    def write_config(self) -> None:
        """config.json: the run's settings (rewritten on resume: runtime options may change)."""
        if self.main:
            self.folder.write("config.json", json.dumps(self.config, indent=2) + "\n")

    # ------------------------------------------------------------------ building blocks

    def items(self, labels) -> list:
        """(path, label, camera) of every training image."""
        return list(zip(self.paths, labels, self.camids))

    def new_heads(self, counts, seed: int | None = None) -> torch.nn.ModuleList:
        """One classifier head a camera (`counts[c]` classes), freshly initialised from `seed`."""
        if seed is not None:
            torch.manual_seed(seed)
        return torch.nn.ModuleList([self.models.ClassifierHead(self.model.out_dim, k)
                                    for k in counts]).to(self.device)

    def train_loader(self, items, sampler) -> DataLoader:
        return DataLoader(ImageDataset(items, TrainTransform(self.cfg.height, self.cfg.width)),
                          batch_sampler=sampler, num_workers=self.workers, pin_memory=self.cuda)

    def sgd(self, lr: float, head_params, lr_head: float) -> torch.optim.SGD:
        """SGD over the backbone (lr) and the head(s) (lr_head)."""
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": lr},
                  {"params": [p for p in head_params if p.requires_grad], "lr": lr_head}]
        return torch.optim.SGD(groups, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)

    def autocast(self):
        return self.models.autocast(self.amp_dtype, self.device)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.cuda else x

    def bar(self, iterable, desc, total=None):
        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                    disable=not (self.cfg.progress and self.main))

    @torch.no_grad()
    def extract(self, items, heads=None, desc="extract", to="all", sparsify=None):
        """Flip-averaged pool5 features (eval mode) and, given heads, the scores
        s = concat_c softmax(head_c(f)). Returns float32 tensors (features, scores|None) on the
        training device in one process (on a GPU they stay there for the distance kernels, the
        merge and the evaluation), on the CPU under several processes: each rank extracts its
        contiguous share of `items` and the shares are gathered in order, to every rank
        (to="all") or to rank 0 (to="main"; the other ranks get (None, None)). With `sparsify`
        (eps, max_per_block) the scores are sparsified batch by batch on the host
        (iics_fast.sparse.ScoreSparsifier) and come back as SparseScores on every rank; the dense
        score matrix is never held."""
        self.model.eval()
        part = D.shard_indices(len(items), self.rank, self.world)
        sparse_out = None
        if sparsify is not None and heads is not None:
            from .sparse import ScoreSparsifier
            sparse_out = ScoreSparsifier([h.classifier.out_features for h in heads], *sparsify,
                                         n_total=len(items), offset=part.start)
        loader = DataLoader(ImageDataset(items[part.start:part.stop],
                                         EvalTransform(self.cfg.height, self.cfg.width)),
                            batch_size=self.cfg.batch_extract, shuffle=False,
                            num_workers=self.workers, pin_memory=self.cuda)
        feats = [torch.zeros(0, self.model.out_dim, device=self.device)]
        scores = ([torch.zeros(0, sum(h.classifier.out_features for h in heads),
                               device=self.device)] if heads else [])
        for x, *_ in self.bar(loader, desc):
            x = self.to_device(x)
            with self.autocast():
                f = (self.model(x).float() + self.model(x.flip(3)).float()) / 2
                if heads is not None:
                    s = torch.cat([F.softmax(h(f).float(), 1) for h in heads], 1)
                    if sparse_out is not None:
                        sparse_out.add(s.cpu())
                    else:
                        scores.append(s)
            feats.append(f.float())
        if sparse_out is not None:
            from .sparse import gather_sparse_scores
            return (self.gather_rows(torch.cat(feats), "all"),
                    gather_sparse_scores(sparse_out.finish()))
        scores = torch.cat(scores) if heads is not None else None
        return self.gather_rows(torch.cat(feats), to), self.gather_rows(scores, to)

    def evaluate(self, figure: str | None = None) -> dict:
        """Flip-averaged, L2-normalised features, cosine distance, Market-1501 protocol; with
        `figure` ("before" | "after") also the ranked lists of a few queries,
        ranked_<figure>.png in the run folder."""
        from . import evaluation
        q, g = self.dataset.query, self.dataset.gallery
        qf, _ = self.extract(q, desc="extract query", to="main")
        gf, _ = self.extract(g, desc="extract gallery", to="main")
        if not self.main:
            return D.broadcast_object(None)
        if figure is not None:
            from .plots import plot_ranked_lists, ranked_lists
            plot_ranked_lists(ranked_lists(qf, gf, q, g, seed=self.cfg.seed),
                              os.path.join(self.cfg.out, f"ranked_{figure}.png"),
                              title=f"{self.cfg.dataset}: {figure} training")
        cmc, mAP = evaluation.evaluate_features(
            F.normalize(qf, dim=1), F.normalize(gf, dim=1),
            np.array([x[1] for x in q]), np.array([x[1] for x in g]),
            np.array([x[2] for x in q]), np.array([x[2] for x in g]))
        cmc = np.asarray(cmc)
        rank = lambda k: float(cmc[min(k, len(cmc)) - 1])  # noqa: E731
        return D.broadcast_object(
            {"mAP": float(mAP), "rank1": rank(1), "rank5": rank(5), "rank10": rank(10)})

    def evaluate_start(self) -> bool:
        """The starting point the rounds improve on (when the run evaluates at all)."""
        if self.can_evaluate and self.cfg.eval_every > 0:
            self.initial_eval = self.evaluate(figure="before")
            self.log(self.describe_eval("before training", self.initial_eval))
            return True
        return False

    def histogram(self, key: str, feats: torch.Tensor, r: int) -> None:
        """Figure 3's similarity histograms of the current features (rank 0, labelled data)."""
        if self.has_labels and self.main:
            from .plots import similarity_histograms
            self.sim_hists[key] = similarity_histograms(
                feats, self.pids, self.camids, derive_seed(self.cfg.seed, r, 9))

    # ------------------------------------------------------------------ reporting

    def log(self, msg: str) -> None:
        if self.cfg.verbose and self.main:
            tqdm.write(msg)

    @staticmethod
    def describe_eval(what: str, e: dict) -> str:
        return (f"{what}: mAP {e['mAP']:.1%}  rank-1 {e['rank1']:.1%}  rank-5 {e['rank5']:.1%}"
                f"  rank-10 {e['rank10']:.1%}")

    def _describe_quality(self, key: str) -> str:
        q = self.row.get(key)
        return f"  ARI {q['ari']:.3f} NMI {q['nmi']:.3f}" if q else ""

    def describe_stage1(self) -> str:
        row, s = self.row, self.row["stage1"]
        return (f"  intra: {sum(row['intra_clusters'])} clusters over {len(self.cameras)} "
                f"cameras{self._describe_quality('intra_quality')} | stage 1: "
                f"{s['iterations']} it, loss {s['loss']:.3f}, acc {s['acc']:.1%}, "
                f"alpha {s['alpha_mean']:.3f}")

    def describe_stage2(self) -> str:
        row, s = self.row, self.row["stage2"]
        return (f"  inter: {row['inter_clusters']} clusters (mu {row['mu']:.4f})"
                f"{self._describe_quality('inter_quality')} | stage 2: {s['iterations']} it, "
                f"CE {s['loss_ce']:.3f}, triplet {s['loss_triplet']:.3f}, acc {s['acc']:.1%}")

    def write_metrics(self) -> None:
        """metrics.jsonl, metrics.png and similarity.png in the output folder (rank 0)."""
        if not self.main:
            return
        self.folder.write("metrics.jsonl", "".join(json.dumps(row) + "\n" for row in self.metrics))
        from .plots import plot_metrics, plot_similarity
        plot_metrics(self.metrics, self.folder.path("metrics.png"), self.initial_eval)
        if self.sim_hists:
            plot_similarity(self.sim_hists, self.folder.path("similarity.png"))


class _NoSync:
    """SequentialStatsSync's interface for one process: nothing to merge."""

    def snapshot(self) -> None:
        pass

    def merge(self) -> None:
        pass
