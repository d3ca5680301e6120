"""The IICS training rounds, resumable at every stage boundary.

One round (`Trainer.run`; docs/method.md): extract features -> intra-camera clustering -> stage 1 (one head a
camera) -> features + scores -> inter-camera distance (Eq. 5) -> inter-camera clustering ->
stage 2 (CE + batch-hard triplet, PK batches) -> evaluation every `eval_every` rounds. The
clustering steps are `iics_fast.pipeline`'s; the two stages are `stage1` and `stage2`.

Every random draw of a stage is seeded from (seed, round, stage), so a run resumed from a
checkpoint replays exactly what an uninterrupted run does (up to nondeterministic GPU kernels).
A checkpoint (`last.pt`) is written atomically after stage 1, after stage 2 and after each round.

Under torchrun every rank runs the same loop: extraction is split across ranks and gathered,
clustering runs on rank 0 and its labels are broadcast, stage 1 gives each rank whole cameras
(their heads, their per-camera batch statistics, merged after every step into what one process
would hold: `norm_sync`), stage 2 splits each P x K batch by identities (normalised with the
whole batch's statistics, the triplet loss mined over the whole gathered batch), gradients are
summed so that a step is the single-process step, and only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import functools
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as D, norm_sync, pipeline
from .checkpoint import derive_seed, rng_states, set_rng_states
from .data.samplers import CameraBatchSampler, PKBatchSampler, group_share
from .evaluation import adjusted_rand_index, normalized_mutual_info
from .losses import batch_hard_triplet
from .trainer_base import TrainerBase

PHASES = ("extract", "intra_cluster", "stage1", "similarity", "inter_cluster", "stage2",
          "evaluate")


def mu_schedule(mu0: float, r: int, rounds: int, power: float) -> float:
    """Poly decay of the Jaccard weight of Eq. 5: mu_r = mu0 * (1 - r / R) ** power."""
    return float(mu0 * (1.0 - r / rounds) ** power)


class Trainer(TrainerBase):
    """Runs the IICS rounds of one resolved config (a dict, see `iics_fast.train.DEFAULTS`);
    the set-up, checks, extraction and reporting are `TrainerBase`'s."""

    # ------------------------------------------------------------------ the round loop

    def run(self) -> list[dict]:
        cfg = self.cfg
        self.take_folder()
        start = self.progress["round"] + (self.progress["done"] == "round")
        if self.progress == {"round": 0, "done": None} and self.initial_eval is None:
            # the first file written, so that every folder a run leaves can be resumed; then
            # the starting point the rounds improve on (redone when a kill interrupted it)
            self.checkpoint(None, 0)
            self.write_config()
            if self.evaluate_start():
                self.checkpoint(None, 0, event="initial eval")
        else:
            self.write_config()
        for r in range(start, cfg.rounds):
            done = self.progress["done"] if self.progress["round"] == r else None
            if done is None:
                self.row = {"round": r, "time": {}}
            self.log(f"---- round {r + 1}/{cfg.rounds}")
            if done is None and cfg.supervised:
                self.supervised_round(r)
                done = "stage2"
            if done is None:
                self.intra_camera_round(r)
                done = "stage1"
            if done == "stage1" and cfg.stages == "both":
                self.inter_camera_round(r)
            if self.evaluates(r):
                self.evaluate_round(r)
            self.end_round(r)
        return self.metrics

    def intra_camera_round(self, r: int) -> None:
        """Extract -> intra-camera clustering -> stage 1; checkpoint "stage1"."""
        cfg = self.cfg
        with self.timed("extract"):
            feats, _ = self.extract(self.items(self.pids), to="main")
        self.histogram(f"round {r} start", feats, r)
        with self.timed("intra_cluster"):
            self.intra_labels = D.agree(functools.partial(
                pipeline.intra_camera_labels, feats, self.camids, cfg.k_intra,
                quantile=cfg.threshold_intra, rerank=self.rerank,
                progress=lambda c: self.bar(c, "intra clustering")), on_main_only=True)
        del feats
        counts = [int(self.intra_labels[self.camids == c].max()) + 1 for c in self.cameras]
        self.row["intra_clusters"] = counts
        cams = int(self.cameras.max()) + 1  # labels per (camera, cluster)
        self.quality("intra_quality", self.intra_labels * cams + self.camids,
                     self.pids * cams + self.camids)
        with self.timed("stage1"):
            heads = self.new_heads(counts, derive_seed(cfg.seed, r, 1))
            self.row["stage1"] = self.stage1(heads, derive_seed(cfg.seed, r, 1))
        self.heads_state = heads.state_dict()
        alphas = [float(a.detach().clamp(0, 1).mean()) for a in self.models.aibn_alphas(self.model)]
        self.row["stage1"]["alpha_mean"] = float(np.mean(alphas or [float("nan")]))
        self.log(self.describe_stage1())
        self.checkpoint("stage1", r)

    def inter_camera_round(self, r: int) -> None:
        """Features + scores -> inter-camera distance -> clustering -> stage 2 (or, with
        --inter-mode sparse, the sparse round instead of the distance and clustering);
        checkpoint "stage2"."""
        cfg = self.cfg
        heads = self.new_heads(self.row["intra_clusters"])
        heads.load_state_dict(self.heads_state)
        heads.eval()
        sparse_round = self.inter_mode == "sparse"
        with self.timed("extract"):
            feats, scores = self.extract(
                self.items(self.pids), heads=heads, desc="extract + scores",
                sparsify=(cfg.sparse_eps, cfg.sparse_max_per_block) if sparse_round else None)
        self.histogram(f"round {r} after stage 1", feats, r)
        self.row["mu"] = mu = mu_schedule(cfg.mu, r, cfg.rounds, cfg.mu_power)
        if sparse_round:
            with self.timed("inter_cluster"):
                self.inter_labels = self.sparse_inter_labels(feats, scores, mu)
            del feats, scores
        else:
            with self.timed("similarity"):
                # the sharded build's device under several processes; in one process where the
                # features are (on a GPU: the Triton kernel, no copy to the host)
                dev = D.comm_device() if self.world > 1 else feats.device
                dist = pipeline.inter_camera_distance(feats.to(dev), scores.to(dev), self.camids,
                                                      mu, cfg.inter_similarity)
            del feats, scores
            with self.timed("inter_cluster"):
                k = None if cfg.threshold_inter is not None else cfg.k_inter
                self.inter_labels = D.agree(functools.partial(
                    pipeline.cluster_distance, dist, k=k, quantile=cfg.threshold_inter,
                    rerank=self.rerank), on_main_only=True)
            del dist
        self.row["inter_clusters"] = n_inter = int(self.inter_labels.max()) + 1
        self.quality("inter_quality", self.inter_labels, self.pids)
        with self.timed("stage2"):
            torch.manual_seed(derive_seed(cfg.seed, r, 2))
            head = self.models.ClassifierHead(self.model.out_dim, n_inter).to(self.device)
            self.row["stage2"] = self.stage2(head, derive_seed(cfg.seed, r, 2))
        self.log(self.describe_stage2())
        self.heads_state = None
        self.checkpoint("stage2", r)

    def sparse_inter_labels(self, feats, scores, mu: float) -> np.ndarray:
        """The inter-camera labels of the sparse round (iics_fast.sparse), every rank searching
        and scoring its share of the rows; its statistics go into the round's metrics row."""
        from . import sparse
        cfg = self.cfg
        rerank = dict(self.rerank) if self.rerank else {}
        labels, info = sparse.sparse_inter_round(
            feats, scores if cfg.inter_similarity == "eq5" else None, self.camids, cfg.k_inter, mu,
            similarity="rerank" if rerank else "cosine", k=cfg.sparse_k, **rerank,
            device=self.device if self.cuda else None)
        self.row["sparse_round"] = info
        return labels

    def supervised_round(self, r: int) -> None:
        """The upper bound's round: the stage-2 losses on the true training identities for as
        many SGD steps as an IICS round takes (`supervised_steps`), one head kept over the
        rounds; checkpoint "stage2"."""
        cfg = self.cfg
        self.inter_labels = np.unique(self.pids, return_inverse=True)[1].astype(np.int64)
        self.row["inter_clusters"] = n = int(self.inter_labels.max()) + 1
        self.row["mu"] = float("nan")  # no inter-camera distance
        with self.timed("stage2"):
            torch.manual_seed(derive_seed(cfg.seed, r, 2))
            head = self.models.ClassifierHead(self.model.out_dim, n).to(self.device)
            if self.heads_state is not None:
                head.load_state_dict(self.heads_state)
            self.row["stage2"] = self.stage2(head, derive_seed(cfg.seed, r, 2),
                                             steps=self.supervised_steps())
        self.heads_state = head.state_dict()
        self.log(self.describe_stage2())
        self.checkpoint("stage2", r)

    def supervised_steps(self) -> int:
        """SGD steps of one IICS round on this data: stage 1's (known in advance) plus, with
        stage 2, stage 2's epochs of PK batches over the true identities (about what stage 2
        takes on the inter-camera clusters, which are about as many)."""
        cfg = self.cfg
        steps = cfg.epochs_intra * len(CameraBatchSampler(self.camids, cfg.batch_per_camera))
        if cfg.stages == "both":
            steps += cfg.epochs_inter * len(PKBatchSampler(self.inter_labels, cfg.batch_p,
                                                           cfg.batch_k))
        return steps

    # ------------------------------------------------------------------ the two stages

    def stage1(self, heads, seed: int) -> dict:
        """Intra-camera training: every iteration 8 images of every camera, each camera
        normalised with its own batch statistics, through its head; the C cross-entropy losses
        are summed and one SGD step is taken. `stage1_forward` grouped runs the cameras as one
        forward under `grouped_batch_stats` (the same statistics, the convolutions batched),
        per-camera one forward a camera as the reference does. Under several processes a rank
        runs the cameras `group_share(C)` (only their heads get gradients here; each head is
        copied from its rank to all at the end) and the summed gradients and merged running
        statistics make each step the single-process step."""
        cfg, k = self.cfg, self.cfg.batch_per_camera
        sampler = self.shard(CameraBatchSampler(self.camids, k, seed=seed), k)
        own = group_share(len(heads), self.rank, self.world)
        net, sync = self.ddp(self.model), self.stats_sync(own, len(heads))
        loader = self.train_loader(self.items(self.intra_labels), sampler)
        opt = self.sgd(cfg.lr_intra, [p for h in heads for p in h.parameters()], cfg.lr_intra_head)
        scaler = self.grad_scaler()
        self.model.train()
        heads.train()
        grouped = cfg.stage1_forward == "grouped"
        cams = [(ci, slice(j * k, (j + 1) * k)) for j, ci in enumerate(own)]  # each camera's rows
        losses, correct, seen = [], 0, 0
        with norm_sync.grouped_batch_stats(self.model, len(own) if grouped else 1):
            for epoch in range(cfg.epochs_intra):
                sampler.set_epoch(epoch)
                bar = self.bar(loader, f"stage 1 epoch {epoch + 1}/{cfg.epochs_intra}")
                for x, y, _, _ in bar:
                    opt.zero_grad(set_to_none=True)
                    x, y = self.to_device(x), y.to(self.device)
                    sync.snapshot()
                    if grouped:
                        with self.autocast():
                            f = net(x)
                            logits = [heads[ci](f[rows]).float() for ci, rows in cams]
                        cam_losses = [F.cross_entropy(lg, y[rows]) for lg, (_, rows) in zip(logits, cams)]
                        scaler.scale(sum(cam_losses)).backward()
                    else:
                        logits, cam_losses = [], []
                        for j, (ci, rows) in enumerate(cams):
                            # DDP reduces the gradients in the backward of a rank's last camera only
                            last = j == len(cams) - 1
                            with contextlib.nullcontext() if net is self.model or last else net.no_sync():
                                with self.autocast():
                                    logits.append(heads[ci](net(x[rows])).float())
                                cam_losses.append(F.cross_entropy(logits[-1], y[rows]))
                                scaler.scale(cam_losses[-1]).backward()  # summing the losses' gradients
                    sync.merge()
                    scaler.step(opt)
                    scaler.update()
                    total = sum(loss.item() for loss in cam_losses)
                    correct += sum(int((lg.argmax(1) == y[rows]).sum()) for lg, (_, rows) in zip(logits, cams))
                    seen += len(y)
                    losses.append(total)
                    bar.set_postfix(loss=f"{total:.3f}")
        del net
        for ci in range(len(heads)):  # every head from the rank that trained it
            D.broadcast_module(heads[ci], src=next(
                r for r in range(self.world) if ci in group_share(len(heads), r, self.world)))
        return self.summed("loss", losses, correct, seen)

    def stage2(self, head, seed: int, steps: int | None = None) -> dict:
        """Inter-camera training: PK batches, CE on the head + batch-hard triplet on the
        pre-BN feature. Under several processes a rank takes whole identities of each batch
        (`group_share(P)`), weights its mean CE by its share of the batch, and mines the
        triplet loss over the whole gathered batch; the norm layers use the whole batch's
        statistics (`synced_batch_stats`), or with sync_bn off the rank's own (the running
        statistics are then averaged over the ranks at the end)."""
        cfg = self.cfg
        sampler = self.shard(PKBatchSampler(self.inter_labels, cfg.batch_p, cfg.batch_k,
                                            seed=seed), cfg.batch_k)
        both = self.models.FeatureAndLogits(self.model, head)
        net, batch = self.ddp(both), cfg.batch_p * cfg.batch_k
        loader = self.train_loader(self.items(self.inter_labels), sampler)
        opt = self.sgd(cfg.lr_inter, head.parameters(), cfg.lr_inter_head)
        scaler = self.grad_scaler()
        self.model.train()
        head.train()
        ce_all, tri_all, correct, seen = [], [], 0, 0
        synced = norm_sync.synced_batch_stats(both) if cfg.sync_bn else contextlib.nullcontext()
        with synced:
            # `steps`: exactly that many steps, over as many epochs as it takes
            epochs = cfg.epochs_inter if steps is None else -(-steps // max(1, len(sampler)))
            for epoch in range(epochs):
                sampler.set_epoch(epoch)
                bar = self.bar(loader, f"stage 2 epoch {epoch + 1}/{epochs}")
                for x, y, _, _ in bar:
                    if steps is not None and len(ce_all) == steps:
                        break
                    x, y = self.to_device(x), y.to(self.device)
                    with self.autocast():
                        f, logits = net(x)
                    logits = logits.float()
                    ce = F.cross_entropy(logits, y)
                    share = len(y) / batch  # 1 in one process
                    tri = batch_hard_triplet(*self.gather_batch(f, y), cfg.margin)
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
            norm_sync.average_running_stats(self.model)
        out = self.summed("loss_ce", ce_all, correct, seen)  # the triplet loss is every rank's
        out["loss_triplet"] = float(np.mean(tri_all)) if tri_all else float("nan")
        return out

    # ------------------------------------------------------------------ evaluation

    def evaluates(self, r: int) -> bool:
        """Whether round r ends with an evaluation (every eval_every rounds and the last)."""
        cfg = self.cfg
        return self.can_evaluate and cfg.eval_every > 0 and (
            (r + 1) % cfg.eval_every == 0 or r == cfg.rounds - 1)

    def evaluate_round(self, r: int) -> None:
        """Evaluates, logs, and keeps `best.pt` (best rank-1, ties broken by mAP)."""
        with self.timed("evaluate"):
            result = self.row["eval"] = self.evaluate(
                figure="after" if r == self.cfg.rounds - 1 else None)
        self.log(self.describe_eval("  eval", result))
        if (result["rank1"], result["mAP"]) > (self.best["rank1"], self.best.get("mAP", -1.0)):
            self.best = {"rank1": result["rank1"], "mAP": result["mAP"], "round": r}
            self.save_best(r, result)

    def quality(self, key: str, labels: np.ndarray, truth: np.ndarray) -> None:
        """ARI and NMI of pseudo labels against the true identities (when the data has them)."""
        if self.has_labels:
            keep = self.pids >= 0
            self.row[key] = {"ari": adjusted_rand_index(labels[keep], truth[keep]),
                             "nmi": normalized_mutual_info(labels[keep], truth[keep])}

    def end_round(self, r: int) -> None:
        """Logs the round's times, writes the metrics and the "round" checkpoint."""
        self.log("  time: " + "  ".join(f"{k} {v:.1f}s" for k, v in self.row["time"].items()))
        self.metrics.append(self.row)
        self.write_metrics()
        self.checkpoint("round", r)

    # ------------------------------------------------------------------ run state

    def state(self) -> dict:
        return {"config": self.config, "progress": dict(self.progress),
                "inter_mode": self.inter_mode,  # auto's choice, kept on resume
                "dataset_fingerprint": self.fingerprint, "dataset_size": len(self.paths),
                "model": self.model.state_dict(), "heads": self.heads_state,
                "intra_labels": self.intra_labels, "inter_labels": self.inter_labels,
                "metrics": self.metrics, "row": self.row, "best": self.best,
                "sim_hists": self.sim_hists, "initial_eval": self.initial_eval,
                "rng": rng_states()}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.progress, self.metrics, self.row = state["progress"], state["metrics"], state["row"]
        self.heads_state = state["heads"]
        self.intra_labels, self.inter_labels = state["intra_labels"], state["inter_labels"]
        self.best, self.sim_hists = state["best"], state["sim_hists"]
        self.initial_eval = state["initial_eval"]
        set_rng_states(state["rng"])

    def timed(self, phase: str):
        """Adds the wall time of the block to this round's `time[phase]`."""
        return _Timer(self.row["time"], phase)


class _Timer:
    def __init__(self, times: dict, phase: str):
        self.times, self.phase = times, phase

    def __enter__(self):
        self.tic = time.perf_counter()

    def __exit__(self, *exc):
        self.times[self.phase] = self.times.get(self.phase, 0.0) + time.perf_counter() - self.tic
        return False


__all__ = ["Trainer", "PHASES", "mu_schedule"]
