"""Plots of a training run (matplotlib, Agg backend): metrics over rounds, and the similarity
distributions of the paper's Figure 3 (`similarity_histograms` computes them)."""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F


def similarity_histograms(feats: torch.Tensor, pids: np.ndarray, camids: np.ndarray,
                          seed: int, max_images: int = 2000, bins: int = 100) -> dict:
    """Histograms of the cosine similarity for the paper's Figure 3: pairs of the same / a
    different identity from the same / a different camera (a random subset of images). As in
    the paper the similarities are min-max normalised into [0, 1]; the raw range is kept."""
    keep = np.flatnonzero(pids >= 0)
    if len(keep) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_images, replace=False))
    x = F.normalize(feats[torch.from_numpy(keep).to(feats.device)].float(), dim=1).cpu()
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    """Rendered in memory, then written atomically (iics_fast.checkpoint.write_atomic)."""
    from .checkpoint import write_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    write_atomic(path, buf.getvalue())


def plot_metrics(rows: list[dict], path: str, initial: dict | None = None) -> None:
    """Evaluation (mAP, rank-1; round 0 = before training), pseudo-label quality (ARI) and
    losses over rounds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rounds = [row["round"] + 1 for row in rows]
    ev = ([(0, initial)] if initial else []) + [
        (row["round"] + 1, row["eval"]) for row in rows if "eval" in row]
    if ev:
        axes[0].plot([r for r, _ in ev], [100 * e["mAP"] for _, e in ev], "o-", label="mAP")
        axes[0].plot([r for r, _ in ev], [100 * e["rank1"] for _, e in ev], "s-", label="rank-1")
    axes[0].set(title="evaluation", xlabel="round", ylabel="%")
    for key, name in (("intra_quality", "intra ARI"), ("inter_quality", "inter ARI")):
        pts = [(row["round"] + 1, row[key]["ari"]) for row in rows if key in row]
        if pts:
            axes[1].plot(*zip(*pts), "o-", label=name)
    axes[1].set(title="pseudo-label quality", xlabel="round", ylabel="adjusted Rand index")
    for stage, key, name in (("stage1", "loss", "stage 1 CE"), ("stage2", "loss_ce", "stage 2 CE"),
                             ("stage2", "loss_triplet", "stage 2 triplet")):
        pts = [(row["round"] + 1, row[stage][key]) for row in rows if stage in row]
        if pts:
            axes[2].plot(*zip(*pts), "o-", label=name)
    axes[2].set(title="losses", xlabel="round")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    if rounds:
        for ax in axes:
            ax.set_xlim(-0.5 if initial else 0.5, max(rounds) + 0.5)
    _save(fig, path)
    plt.close(fig)


def plot_similarity(hists: dict, path: str) -> None:
    """Figure 3 of the paper: cosine-similarity distributions of same/other identity x
    same/other camera pairs, at the start, after the first stage 1, and at the latest point."""
    plt = _pyplot()
    keys = list(hists)
    chosen = list(dict.fromkeys(keys[:2] + keys[-1:]))
    fig, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 3.6), squeeze=False)
    colors = {"same id, same camera": "tab:blue", "same id, other camera": "tab:red",
              "other id, same camera": "gold", "other id, other camera": "tab:green"}
    for ax, key in zip(axes[0], chosen):
        h = hists[key]
        edges = np.asarray(h["edges"])
        centers = 0.5 * (edges[1:] + edges[:-1])
        for name, color in colors.items():
            counts = np.asarray(h[name], dtype=np.float64)
            if counts.sum() > 0:
                ax.plot(centers, counts / counts.sum(), color=color, label=name)
        lo, hi = h["range"]
        ax.set(title=key, xlabel=f"cosine similarity, normalised from [{lo:.3f}, {hi:.3f}]",
               ylabel="fraction of pairs")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def ranked_lists(qf, gf, query: list, gallery: list, num_queries: int = 6, top_k: int = 10,
                 seed: int = 0, known: bool = True) -> list[tuple]:
    """The top-k gallery items of a few queries by cosine distance, as the evaluation ranks
    them: gallery images of the query's identity under the query's camera are left out (they
    are not counted by the Market-1501 protocol), and so is pid -1 (junk). `query` / `gallery`
    are (path, pid, camid) items; a pid of None means unknown, and `known=False` (a dataset
    that is not `evaluable`, e.g. a folder's pid -1) makes every pid unknown: nothing is left
    out and no match is flagged. Queries are drawn at random (seeded) among those with a match
    in the gallery when identities are known.
    Returns [(query item, [(gallery item, distance, match: bool | None)])]."""
    import torch

    if not known:
        query, gallery = ([(p, None, c) for p, _, c in items] for items in (query, gallery))
    qf = torch.nn.functional.normalize(torch.as_tensor(qf).float(), dim=1)
    gf = torch.nn.functional.normalize(torch.as_tensor(gf).float(), dim=1)
    g_pid = np.array([-2 if g[1] is None else g[1] for g in gallery])
    g_cam = np.array([g[2] for g in gallery])
    known = [i for i, q in enumerate(query) if q[1] is not None]
    pool = [i for i in known if ((g_pid == query[i][1]) & (g_cam != query[i][2])).any()] \
        or list(range(len(query)))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(pool, size=min(num_queries, len(pool)), replace=False).tolist())
    out = []
    for i in chosen:
        _, pid, cam = query[i]
        dist = (1.0 - gf @ qf[i]).numpy()
        keep = g_pid != -1
        if pid is not None:
            keep &= ~((g_pid == pid) & (g_cam == cam))
        order = np.flatnonzero(keep)[np.argsort(dist[keep], kind="stable")][:top_k]
        out.append((query[i], [(gallery[j], float(dist[j]),
                                None if pid is None or gallery[j][1] is None
                                else bool(gallery[j][1] == pid and pid > 0)) for j in order]))
    return out


def plot_ranked_lists(lists: list[tuple], path: str, title: str = "") -> None:
    """One row per query: the query image, then its ranked gallery images framed green for
    a true match, red otherwise (grey when the identities are unknown)."""
    from .data.transforms import load_image

    plt = _pyplot()
    top_k = max((len(r) for _, r in lists), default=1)
    fig, axes = plt.subplots(len(lists), top_k + 1, figsize=(1.1 * (top_k + 1), 2.3 * len(lists)),
                             squeeze=False)
    colours = {True: "#1a9641", False: "#d7191c", None: "#888888"}
    for row, (q, ranked) in zip(axes, lists):
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
        row[0].imshow(load_image(q[0]))
        row[0].set_title("query" + ("" if q[1] is None else f"\nid {q[1]} cam {q[2] + 1}"),
                         fontsize=7)
        for k, (g, d, match) in enumerate(ranked, 1):
            ax = row[k]
            ax.imshow(load_image(g[0]))
            for s in ax.spines.values():
                s.set_visible(True)
                s.set_color(colours[match])
                s.set_linewidth(4)
            ax.set_title(f"{k}: {d:.3f}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)
    plt.close(fig)
