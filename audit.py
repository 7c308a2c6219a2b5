"""The epoch audit (ours): after every epoch, each sample of the mixed set is scored on its plain
image against its class's real images, and a synthetic one ranked below --audit-q of them is a
suspect in the next epoch (--relabel audit), or only measured (--relabel on: the paper's rule
relabels, the audit's AUCs say how well each score would have found the planted images).
docs/detectors.md has the measurements.
"""
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

import report

SCORES = ("p", "margin", "both")  # log p(label), the prototype margin, and their ranks summed


@dataclasses.dataclass
class Suspects:
    """The suspects over the mixed set, made in one place (new) and kept in the checkpoint."""
    counts: torch.Tensor  # [N] int32 on the device: epochs each sample was a suspect in a step
    total: torch.Tensor  # [N] int32 on the host: counts summed over processes, last epoch's end
    scores: torch.Tensor  # [N, 2] on the host: the last epoch audit's scores, None before it
    next: torch.Tensor  # [N] bool on the host: the audit's suspects for the next epoch

    @classmethod
    def new(cls, run, ckpt=None):
        n = len(run.mixed)
        counts = torch.zeros(n, dtype=torch.int32, device=run.device)
        if not ckpt:
            return cls(counts, counts.cpu().clone(), None, torch.zeros(n, dtype=torch.bool))
        # the saved counts are summed over processes: one process carries them on
        if run.rank == 0:
            counts += ckpt["flagged"].to(run.device)
        return cls(counts, ckpt["flagged"], ckpt.get("audit"),
                   ckpt.get("suspects", torch.zeros(n, dtype=torch.bool)))

    def end_epoch(self, run):
        """[N] bool on the host: the samples that were suspects in a step of this epoch."""
        before, self.total = self.total, run.sum(self.counts.clone()).cpu()
        return (self.total - before).numpy() > 0

    def state(self):  # the checkpoint's keys, as runs made before this class have them
        return {"flagged": self.total, "audit": self.scores, "suspects": self.next}


def epoch_audit(run, cfg, protos, suspects, epoch_suspects):
    """Score every sample of the mixed set on its plain image; a synthetic one ranked below
    --audit-q of its class's real images is a suspect next epoch. The metrics' audit fields."""
    mixed = run.mixed
    suspects.scores = score_mixed_set(run, protos).cpu()
    real = torch.from_numpy(~mixed.is_syn)
    ranks = audit_ranks(suspects.scores, torch.from_numpy(mixed.labels), real)
    low = ranks[:, SCORES.index(cfg["audit_score"])] < cfg["audit_q"]
    suspects.next = low & torch.from_numpy(mixed.is_syn)
    fig = audit_figures(suspects.scores, ranks, mixed, cfg["audit_q"], epoch_suspects)
    return {**{f"auc_{k}": fig[k]["auc"] for k in (*SCORES, "flags")}, "audit": fig}


@torch.no_grad()
def score_mixed_set(run, protos):
    """[N, 2] scores of every sample of the mixed set on its plain image, in eval mode."""
    run.eval()
    scores = torch.zeros(len(run.mixed), 2, device=run.device)
    unit = F.normalize(protos.float(), dim=-1)
    labels = torch.from_numpy(run.mixed.labels).to(run.device)
    for i, x in run.plain(run.batches.images):
        with torch.autocast(run.device.type, torch.bfloat16, enabled=run.amp):
            f = run.model.features(x)
            logits, z = run.model.fc(f), run.model.project(f)
        scores[i:i + len(x)] = audit_scores(logits, z, labels[i:i + len(x)], unit)
    return run.sum(scores)


def audit_scores(logits, z, y, protos):
    """[B, 2], higher = more like its class: the classifier's log p(y | x), and the prototype
    margin (cosine to its class's prototype minus the nearest other class's, the lower over the
    prototypes' views). logits [B, C], unit z [B, D], labels y [B], unit prototypes [C, V, D]."""
    with torch.autocast(z.device.type, enabled=False):
        cos = torch.einsum("bd,cvd->bvc", z.float(), protos.float())  # B x V x C
    own = y[:, None, None].expand(-1, cos.shape[1], 1)
    margin = cos.gather(2, own)[..., 0] - cos.scatter(2, own, -torch.inf).amax(2)  # B x V
    log_p = F.log_softmax(logits.float(), 1).gather(1, y[:, None])[:, 0]
    return torch.stack([log_p, margin.amin(1)], 1)


def reference_rank(score, labels, real):
    """[N]: per sample, the share of its class's real samples that score lower. The real images
    are the reference: flagging ranks below q flags about q of anything drawn like them, whatever
    the model."""
    rank = torch.zeros_like(score)
    for c in labels.unique():
        of_c = labels == c
        ref = score[of_c & real].sort().values
        rank[of_c] = torch.searchsorted(ref, score[of_c]).float() / max(len(ref), 1)
    return rank


def audit_ranks(scores, labels, real):
    """[N, 3] reference ranks of the scores p, margin and both (the sum of the first two ranks),
    host tensors."""
    r = [reference_rank(s.contiguous(), labels, real) for s in scores.T]
    return torch.stack(r + [reference_rank(r[0] + r[1], labels, real)], 1)


# ---------------------------------------------------------------- the audit's figures


def auc(score, positive):
    """The chance that a positive scores above a negative, ties counting half (Mann-Whitney); None
    without both."""
    s, pos = np.asarray(score, float), np.asarray(positive, bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if not n1 or not n0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, ties averaged
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def audit_figures(scores, ranks, mixed, q, flags):
    """metrics.jsonl's audit fields: per score, the detector figures of flagging a synthetic sample
    ranked below q and the AUC (planted vs clean; of the rank sum for both), and the AUC of the
    flags the step used this epoch (flags [N]: the paper's rule's, or the audit's with --relabel
    audit); per class, the 10/50/90% points of log p and margin for real, clean and planted
    samples."""
    syn, noisy, y = mixed.is_syn, mixed.is_noisy, mixed.labels
    raw = torch.cat([scores, (ranks[:, 0] + ranks[:, 1])[:, None]], 1).numpy()
    fig = {name: {**report.detector(syn & (ranks[:, k] < q).numpy(), mixed),
                  "auc": auc(-raw[syn, k], noisy[syn])} for k, name in enumerate(SCORES)}
    fig["flags"] = {"auc": auc(flags[syn], noisy[syn])}
    groups = {"real": ~syn, "clean": syn & ~noisy, "planted": noisy}
    quantiles = lambda m, k: (np.quantile(raw[m, k], [0.1, 0.5, 0.9]).round(4).tolist()
                              if m.any() else None)
    fig["per_class"] = {name: {g: [quantiles(m & (y == c), k) for c in range(len(mixed.classes))]
                               for g, m in groups.items() if m.any()}
                        for k, name in enumerate(("p", "margin"))}
    return fig
