"""The epoch audit (ours): after every epoch each sample is scored on its plain image against its
class's real images; a synthetic one ranked below --audit-q of them is a suspect next epoch
(--relabel audit), or only measured (docs/detectors.md)."""
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

import report

SCORES = ("p", "margin", "both")  # log p(label), the prototype margin, and their ranks summed


@dataclasses.dataclass
class Suspects:
    """The suspects over the mixed set, kept in the checkpoint."""
    counts: torch.Tensor  # [N] int32 on the device: epochs each sample was a suspect in a step
    total: torch.Tensor  # [N] int32 on the host: counts at the last epoch's end
    scores: torch.Tensor  # [N, 2] on the host: the last epoch audit's scores, None before it
    next: torch.Tensor  # [N] bool on the host: the audit's suspects for the next epoch

    @classmethod
    def new(cls, run, ckpt=None):
        n = len(run.mixed)
        counts = torch.zeros(n, dtype=torch.int32, device=run.device)
        if not ckpt:
            return cls(counts, counts.cpu().clone(), None, torch.zeros(n, dtype=torch.bool))
        counts += ckpt["flagged"].to(run.device)
        return cls(counts, ckpt["flagged"], ckpt.get("audit"),
                   ckpt.get("suspects", torch.zeros(n, dtype=torch.bool)))

    def end_epoch(self, run):  # [N] bool on the host: the suspects of this epoch's steps
        before, self.total = self.total, self.counts.clone().cpu()
        return (self.total - before).numpy() > 0

    def state(self):  # the checkpoint's keys, as runs made before this class have them
        return {"flagged": self.total, "audit": self.scores, "suspects": self.next}


def epoch_audit(run, cfg, protos, suspects, epoch_suspects):
    """Score the mixed set and pick the next epoch's suspects; the metrics' audit fields."""
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
    """[N, 2] scores of every sample on its plain image, in eval mode."""
    run.model.eval()
    scores = torch.zeros(len(run.mixed), 2, device=run.device)
    unit = F.normalize(protos.float(), dim=-1)
    labels = torch.from_numpy(run.mixed.labels).to(run.device)
    for i, x in run.plain(run.batches.images):
        with torch.autocast(run.device.type, torch.bfloat16, enabled=run.amp):
            f = run.model.features(x)
            logits, z = run.model.fc(f), run.model.project(f)
        scores[i:i + len(x)] = audit_scores(logits, z, labels[i:i + len(x)], unit)
    return scores


def audit_scores(logits, z, y, protos):
    """[B, 2], higher = more like its class: log p(y | x), and the prototype margin (cosine to its
    class's prototype minus the nearest other's, the lower over the views). protos [C, V, D]."""
    with torch.autocast(z.device.type, enabled=False):
        cos = torch.einsum("bd,cvd->bvc", z.float(), protos.float())  # B x V x C
    own = y[:, None, None].expand(-1, cos.shape[1], 1)
    margin = cos.gather(2, own)[..., 0] - cos.scatter(2, own, -torch.inf).amax(2)  # B x V
    log_p = F.log_softmax(logits.float(), 1).gather(1, y[:, None])[:, 0]
    return torch.stack([log_p, margin.amin(1)], 1)


def reference_rank(score, labels, real):
    """[N]: per sample, the share of its class's real samples that score lower: below q flags about
    q of anything drawn like them, whatever the model."""
    rank = torch.zeros_like(score)
    for c in labels.unique():
        of_c = labels == c
        ref = score[of_c & real].sort().values
        rank[of_c] = torch.searchsorted(ref, score[of_c]).float() / max(len(ref), 1)
    return rank


def audit_ranks(scores, labels, real):
    """[N, 3] reference ranks of p, margin and both (the sum of the first two ranks)."""
    r = [reference_rank(s.contiguous(), labels, real) for s in scores.T]
    return torch.stack(r + [reference_rank(r[0] + r[1], labels, real)], 1)


# ---------------------------------------------------------------- the audit's figures


def auc(score, positive):
    """P(a positive scores above a negative), ties half (Mann-Whitney); None without both."""
    s, pos = np.asarray(score, float), np.asarray(positive, bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if not n1 or not n0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, ties averaged
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def audit_figures(scores, ranks, mixed, q, flags):
    """metrics.jsonl's audit fields: per score the detector figures of its flags and its AUC
    (planted vs clean), the AUC of the step's flags, and per class the 10/50/90% points of each
    score for real, clean and planted samples."""
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
