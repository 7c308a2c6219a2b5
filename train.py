"""SAU training: one ResNet-32, a synthetic-unaware classifier and a synthetic-aware contrastive branch.

    python train.py --dataset cifar10 --imb 100                 # SAU.md defaults, writes runs/<name>/
    python train.py --dataset cifar10 --imb 100 --syn none      # the long-tailed baseline
    python train.py --resume runs/<name>                        # continue a killed run
"""
import argparse
import fcntl
import glob
import itertools
import json
import math
import os
import socket
import sys
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from model import resnet32

S, POSITIVE, NON_NEGATIVE, AT_LEAST_1 = data.Setting, data.POSITIVE, data.NON_NEGATIVE, data.AT_LEAST_1
ON_OFF = ("on", "off")
AUDIT_SCORES = ("p", "margin", "both")
# Every setting, one entry each: default (the paper's value unless marked ours), help, check, choices, run-name tag,
# scope (data.Setting). The parser, the checks, the run name, --resume and --summarize all follow from this table.
CONFIG = {
    **data.DATA_CONFIG,  # dataset, imb, syn, syn_ratio, syn_noise, pool, data_root, data_seed
    "w_cls": S(1.0, "weight of the classification branch (mixup + cutmix); 0 skips it", NON_NEGATIVE, tag="wcls"),
    "w_con": S(1.0, "weight of the contrastive branch; 0 skips it and its prototypes", NON_NEGATIVE, tag="wcon"),
    "relabel": S("on", "who is a suspect, relabelled by --strategy: on: the paper's rule | audit: the epoch audit's "
                 "flags (ours) | off: nobody", choices=("on", "audit", "off")),
    "audit_score": S("p", "--relabel audit's score: p: the classifier's log p(label) | margin: the prototype margin | "
                     "both: their ranks summed (ours)", choices=AUDIT_SCORES, tag="as"),
    "audit_q": S(0.1, "--relabel audit flags a synthetic sample scoring below this quantile of its class's real "
                 "images: the false-flag rate accepted (ours)", (lambda v: 0 < v < 1, "in (0, 1)"), tag="q"),
    "audit_cls": S("off", "on: a mixup or cutmix pair holding a suspect of --relabel audit leaves the classification "
                   "branch too (ours)", choices=ON_OFF, tag="acls"),
    "strategy": S("pos_neg", "what suspects become", choices=("pos_neg", "neg_only", "drop"), tag=""),
    "temperature": S(0.1, "contrastive temperature", POSITIVE, tag="t"),
    "mix_alpha": S(1.0, "mixup and cutmix lam ~ Beta(alpha, alpha)", POSITIVE, tag="alpha"),
    "epochs": S(200, "epochs, each one pass of stream A", AT_LEAST_1, tag="e"),
    "batch_size": S(128, "images per step in each stream", (lambda v: v >= 2, ">= 2"), tag="b"),
    "lr": S(0.01, "SGD learning rate, cosine-annealed per epoch to 0", POSITIVE),
    "momentum": S(0.9, "SGD momentum", (lambda v: 0 <= v < 1, "in [0, 1)"), tag="m"),
    "weight_decay": S(5e-3, "SGD weight decay", NON_NEGATIVE, tag="wd"),
    "width": S(64, "ResNet-32 stem width (stages w, 2w, 4w)", (lambda v: v >= 2 and v % 2 == 0, "even and >= 2"),
               tag="w"),
    "seed": S(0, "training seed: init, order, augmentation, mixing", data.SEED, named="never"),
    "amp": S("auto", "bf16 autocast: auto (on CUDA, and on a CPU with native bf16) | bf16 | off",
             choices=("auto", "bf16", "off")),
    "loader": S("auto", "auto (gpu on CUDA, else cpu) | cpu: DataLoader workers + torchvision, as the paper | gpu: the "
                "set held on the device, views as batched tensor ops (ours)", choices=("auto", "cpu", "gpu")),
    "sync_bn": S("off", "with torchrun: off: BatchNorm statistics per process, as the paper | on: over all",
                 choices=ON_OFF, tag="syncbn"),
    "device": data.DEVICE,
    "workers": S(-1, "DataLoader worker processes (--loader cpu); -1: 0 on a CPU device (fastest there, measured), "
                 "min(8, CPUs) on CUDA", (lambda v: v >= -1, ">= -1"), scope="runtime"),
    "channels_last": S("on", "channels_last memory format for the network (ours)", choices=ON_OFF, scope="runtime"),
    "compile": S("off", "torch.compile the backbone (ours)", choices=ON_OFF, scope="runtime"),
    "deterministic": S("off", "on: deterministic CUDA kernels, so a resumed CUDA run ends with the same weights as an "
                       "uninterrupted one (CPU runs always do); somewhat slower (ours)", choices=ON_OFF,
                       scope="runtime"),
    "bench": S(0, "time this many steps after warm-up with the run's flags, print the figures and exit (ours)",
               NON_NEGATIVE, scope="call"),
    "out": S("", "run folder; empty: runs/<name from the settings that differ from the defaults>", scope="call"),
    "resume": S("", "continue the run in this folder; flags not given are taken from it", scope="call"),
    "stop_after": S(0, "leave after this many epochs in total, checkpoint kept (for time-limited jobs; ours)",
                    NON_NEGATIVE, scope="call"),
}
# A setting that cannot act under another one is refused rather than silently named: (setting, when, because).
IGNORED = [("strategy", lambda c: c["relabel"] == "off", "--relabel off"),
           *[(k, lambda c: c["relabel"] != "audit", "--relabel other than audit") for k in ("audit_score", "audit_q", "audit_cls")],
           *[(k, lambda c: c["w_con"] == 0, "--w-con 0") for k in ("relabel", "strategy", "temperature")],
           *[(k, lambda c: c["w_cls"] == 0, "--w-cls 0") for k in ("mix_alpha", "audit_cls")],
           *[(k, lambda c: c["syn"] == "none", "--syn none") for k in ("syn_ratio", "syn_noise", "pool")],
           ("pool", lambda c: c["syn"] == "heldout", "--syn heldout"),
           ("workers", lambda c: c["loader"] == "gpu", "--loader gpu"),
           ("sync_bn", lambda c: int(os.environ.get("WORLD_SIZE", 1)) == 1, "one process (it acts under torchrun)")]


def make_parser(with_defaults=True):
    p = data.settings_parser(CONFIG, __doc__, with_defaults, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--summarize", nargs="+", metavar="RUN", help="mean and std of finished runs' final metrics over "
                   "seeds (writes --out or runs/summary_<name>.md/.json) and exit")
    return p


def get_config(argv=None):
    cfg = vars(make_parser().parse_args(argv))
    given = vars(make_parser(False).parse_args(argv))
    if cfg["resume"]:  # settings not given come from the run being resumed, its runtime choices too
        saved = os.path.join(cfg["resume"], "config.json")
        if os.path.isfile(saved):
            saved = read_json(saved)
        elif os.path.isfile(os.path.join(cfg["resume"], "checkpoint.pt")):  # config.json is derived: rebuilt from it
            saved = load_checkpoint(cfg["resume"])["config"]
        else:
            raise data.SAUError(f"--resume {cfg['resume']}: no config.json there, so no run to continue")
        kept = {k: v for k, v in saved.items() if k in CONFIG and CONFIG[k].scope != "call"}
        cfg = {**cfg, **kept, **given, "out": cfg["resume"]}
    data.check_settings(cfg, CONFIG)
    if cfg["w_cls"] == cfg["w_con"] == 0:
        raise data.SAUError("--w-cls and --w-con are both 0: nothing to train")
    for key, when, because in IGNORED:
        if key in given and cfg[key] != CONFIG[key].default and when(cfg):
            raise data.SAUError(f"--{key.replace('_', '-')} {cfg[key]} has no effect with {because}: leave it out")
    return cfg


def run_name(cfg, seed=True):
    """The settings that shape the results, where they differ from the defaults, then the seed."""
    value = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    parts = [(k if s.tag is None else s.tag) + value(cfg[k]) for k, s in CONFIG.items() if s.scope == "run" and (
        s.named == "always" or s.named == "changed" and cfg[k] != s.default)]
    return "_".join(parts + ([f"s{cfg['seed']}"] if seed else []))


def read_json(path):
    try:
        return json.loads(open(path).read())
    except (OSError, ValueError) as e:
        raise data.SAUError(f"{path} is unreadable or not JSON ({e.__class__.__name__}): restore or delete it") from None


# ---------------------------------------------------------------- losses

def soft_ce(logits, targets, weight=None):
    """Cross-entropy with soft targets: mean_i(-sum_k t_ik log_softmax(o)_ik); weight [B]: a weighted mean."""
    ce = -(targets * F.log_softmax(logits.float(), dim=1)).sum(1)
    return ce.mean() if weight is None else (ce * weight).sum() / weight.sum().clamp(min=1)


def supcon(feats, labels, is_anchor, temperature, member=None):
    """Supervised contrastive loss. feats [M, V, D], labels [M], is_anchor [M] bool -> scalar. member [M] bool
    (default all): non-members are no anchor, no positive and in no denominator, as if left out (fixed shapes)."""
    m, v = feats.shape[:2]
    member = torch.ones_like(is_anchor) if member is None else member
    with torch.autocast(feats.device.type, enabled=False):  # fp32 products, also inside the step's bf16 autocast
        f = feats.transpose(0, 1).reshape(m * v, -1).float()  # MV x D, view-major
        y, keep = labels.repeat(v), member.repeat(v)  # MV
        self_pair = torch.eye(m * v, dtype=torch.bool, device=f.device)
        logits = (f @ f.T / temperature).masked_fill(~keep[None, :], -torch.inf)  # MV x MV
        # log-softmax over all other members; logsumexp subtracts the row max for stability
        log_prob = logits - torch.logsumexp(logits.masked_fill(self_pair, -torch.inf), dim=1, keepdim=True)
        pos = (y[:, None] == y[None, :]) & ~self_pair & keep[None, :]  # MV x MV
        per_anchor = -log_prob.masked_fill(~pos, 0).sum(1) / pos.sum(1).clamp(min=1)  # MV; no positive -> 0
        anchors = (is_anchor & member).repeat(v)
        return (per_anchor * anchors).sum() / anchors.sum().clamp(min=1)


@torch.no_grad()
def find_suspects(feats, labels, in_anchor_set):
    """[M] bool: the most cosine-similar member of the anchor set, in either view, has another label.
    feats [M, V, D]; a sample outside the anchor set (a synthetic one) is never its own neighbour."""
    f = F.normalize(feats.float(), dim=-1)
    with torch.autocast(f.device.type, enabled=False):  # fp32, also inside the step's bf16 autocast
        sim = torch.einsum("mvd,avd->vma", f, f).masked_fill(~in_anchor_set, -torch.inf)  # V x M x M
    return (labels[sim.argmax(-1)] != labels).any(0)  # V x M -> M


def sau_contrastive_loss(z, labels, is_syn, prototypes, strategy="pos_neg", temperature=0.1, relabel=True,
                         return_suspects=False, given=None):
    """SAU.md section 5. z [B, 2, D] unit, labels [B], is_syn [B], prototypes [C, 2, D] -> scalar loss (and the
    suspects, [B] bool). given [B] bool: the suspects (the audit's) in place of the paper's rule. Who takes part is
    a mask, not a subset, so the step never waits for the host."""
    if strategy not in CONFIG["strategy"].choices:
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {CONFIG['strategy'].choices}")
    b, c = len(labels), len(prototypes)
    feats = torch.cat([z, prototypes.to(z.dtype)])  # (B + C) x 2 x D
    y = torch.cat([labels, torch.arange(c, device=z.device)])  # B + C
    syn = torch.cat([is_syn.bool(), torch.zeros(c, dtype=torch.bool, device=z.device)])
    if given is not None:
        suspect = torch.cat([given.bool(), torch.zeros(c, dtype=torch.bool, device=z.device)]) & syn
    else:  # the paper's rule; anchor set: real + prototypes
        suspect = find_suspects(feats, y, ~syn) & syn if relabel else torch.zeros_like(syn)
    member, anchor = torch.ones_like(syn), torch.ones_like(syn)
    if strategy == "pos_neg":  # a fresh label each: positive only with its own other view
        y = torch.where(suspect, -1 - torch.arange(b + c, device=z.device), y)
    elif strategy == "neg_only":  # contrast samples only, never anchors
        y = torch.where(suspect, -1, y)
        anchor = ~suspect
    else:  # drop
        member = ~suspect
    loss = supcon(feats, y, anchor, temperature, member)
    return (loss, suspect[:b]) if return_suspects else loss


def cutmix(xa, xb, lam, rng):
    """Paste from xb a box of side W * sqrt(1 - lam) centred at a uniform point; return (x, weight of xa).
    The reference's geometry: a continuous centre, the clipped edges rounded to pixels."""
    h, w = xa.shape[-2:]
    bh, bw = h * math.sqrt(1 - lam), w * math.sqrt(1 - lam)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    y0, y1 = round(max(cy - bh / 2, 0)), round(min(cy + bh / 2, h))
    x0, x1 = round(max(cx - bw / 2, 0)), round(min(cx + bw / 2, w))
    x = xa.clone()
    x[:, :, y0:y1, x0:x1] = xb[:, :, y0:y1, x0:x1]
    return x, 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the true pasted area, also when clipped


class Batch(NamedTuple):
    """One step's inputs, on the device, by name; a branch that is off gets None for its own."""
    x_mix: torch.Tensor  # B x 3 x 32 x 32: mixup of A's v1 with B's (classification branch)
    t_mix: torch.Tensor  # B x C: its soft targets
    x_cut: torch.Tensor  # B x 3 x 32 x 32: cutmix of the same pair
    t_cut: torch.Tensor  # B x C
    v2: torch.Tensor  # B x 3 x 32 x 32: A's views for the contrastive branch
    v3: torch.Tensor
    y: torch.Tensor  # B: A's labels
    is_syn: torch.Tensor  # B bool
    index: torch.Tensor  # B: each sample's position in the mixed set
    protos: torch.Tensor  # C x 2 x D: this epoch's real-data prototypes
    epoch: int  # 0-based
    suspect: torch.Tensor = None  # B bool: the epoch audit's suspects (--relabel audit), else None
    keep: torch.Tensor = None  # B: 1 for a mixed pair without a suspect, else 0 (--audit-cls on), else None


class Step(torch.nn.Module):
    """The forward passes of one step and their losses, as one module call so that DistributedDataParallel sees one
    forward per backward. It sees the run's settings, the real and synthetic counts per class (n_real, n_syn: C on
    the device) and, per call, a Batch."""

    def __init__(self, model, cfg, n_real, n_syn):
        super().__init__()
        self.model, self.cfg, self.n_real, self.n_syn = model, cfg, n_real, n_syn

    def forward(self, b: Batch):
        m, cfg = self.model, self.cfg
        zero = torch.zeros((), device=b.y.device)
        loss_cls, loss_con, suspect = zero, zero, torch.zeros_like(b.is_syn)
        if b.x_mix is not None:  # the whole model, as the reference: the projection head's BatchNorm sees these too
            loss_cls = soft_ce(m(b.x_mix)[0], b.t_mix, b.keep) + soft_ce(m(b.x_cut)[0], b.t_cut, b.keep)
        if b.v2 is not None:
            z = torch.stack([m.project(m.features(b.v2)), m.project(m.features(b.v3))], 1)  # B x 2 x 128
            loss_con, suspect = sau_contrastive_loss(z, b.y, b.is_syn, b.protos, cfg["strategy"], cfg["temperature"],
                                                     cfg["relabel"] == "on", return_suspects=True, given=b.suspect)
        return cfg["w_cls"] * loss_cls + cfg["w_con"] * loss_con, loss_cls, loss_con, suspect


def all_sum(t, world):
    if world > 1:
        torch.distributed.all_reduce(t)
    return t


# ---------------------------------------------------------------- prototypes and evaluation

def project_views(run, *views):
    """[B, V, D]: each view through the backbone and the projection head, under the run's autocast."""
    with torch.autocast(run.device.type, torch.bfloat16, enabled=run.amp):
        return torch.stack([run.model.project(run.model.features(run.prep(v))) for v in views], 1)


@torch.no_grad()
def prototypes(run, seed):
    """[C, 2, D]: per class, the mean projection of its real images through v2 and v3 (eval mode)."""
    model, device = run.model, run.device
    model.eval()
    num_classes = len(run.mixed.classes)
    sums = torch.zeros(num_classes, 2, model.proj[-1].out_features, device=device)
    counts = torch.zeros(num_classes, device=device)
    for v2, v3, yb, *_ in run.batches(("v2", "v3"), 256, data.rank_seed(seed, run.rank), run.real_share):
        yb = yb.to(device, non_blocking=True)
        z = project_views(run, v2, v3)
        sums.index_add_(0, yb, z.float())  # C x 2 x D
        counts.index_add_(0, yb, torch.ones_like(yb, dtype=torch.float))
    return all_sum(sums, run.world) / all_sum(counts, run.world).clamp(min=1)[:, None, None]


def plain_batches(run, images, batch_size=1000):
    """(start, x): this process's share of uint8 [N, 3, 32, 32] images (host or device), unaugmented, normalised on
    the device."""
    for i in range(run.rank * batch_size, len(images), run.world * batch_size):
        yield i, run.prep((images[i:i + batch_size].to(run.device).float() / 255 - run.mean) / run.std)


@torch.no_grad()
def evaluate(run):
    """Top-1, top-5, per-class accuracy, many/medium/few and the confusion matrix on the test set."""
    model, device, n_real = run.model, run.device, run.mixed.n_real
    model.eval()
    num_classes = len(n_real)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    top5_hits = torch.zeros((), dtype=torch.long, device=device)
    for i, x in plain_batches(run, run.x_test):
        y = run.y_test[i:i + len(x)].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=run.amp):
            top5 = model.fc(model.features(x)).float().topk(min(5, num_classes), 1).indices
        confusion.index_add_(0, y * num_classes + top5[:, 0], torch.ones_like(y))
        top5_hits += (top5 == y[:, None]).any(1).sum()
    confusion = all_sum(confusion, run.world).reshape(num_classes, num_classes).cpu()
    top5_hits = all_sum(top5_hits, run.world).item()
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    groups = {g: [a for a, n in zip(per_class, n_real) if data.shot_group(n) == g] for g in ("many", "medium", "few")}
    return {"top1": 100 * confusion.diag().sum().item() / len(run.y_test), "top5": 100 * top5_hits / len(run.y_test),
            **{g: 100 * sum(v) / len(v) if v else None for g, v in groups.items()},
            "per_class": [100 * a for a in per_class], "confusion": confusion.tolist()}


# ---------------------------------------------------------------- the epoch audit (ours)

@torch.no_grad()
def audit(run, protos):
    """[N, 2] scores of every sample of the mixed set on its plain image, in eval mode (audit_scores)."""
    run.model.eval()
    scores = torch.zeros(len(run.mixed), 2, device=run.device)
    unit = F.normalize(protos.float(), dim=-1)
    for i, x in plain_batches(run, run.x_train):
        with torch.autocast(run.device.type, torch.bfloat16, enabled=run.amp):
            f = run.model.features(x)
            logits, z = run.model.fc(f), run.model.project(f)
        scores[i:i + len(x)] = audit_scores(logits, z, run.y_train[i:i + len(x)], unit)
    return all_sum(scores, run.world)


def audit_scores(logits, z, y, protos):
    """[B, 2], higher = more like its class: the classifier's log p(y | x), and the prototype margin (cosine to its
    class's prototype minus the nearest other class's, the lower over the prototypes' views). logits [B, C], unit
    z [B, D], labels y [B], unit prototypes [C, V, D]."""
    with torch.autocast(z.device.type, enabled=False):
        cos = torch.einsum("bd,cvd->bvc", z.float(), protos.float())  # B x V x C
    own = y[:, None, None].expand(-1, cos.shape[1], 1)
    margin = cos.gather(2, own)[..., 0] - cos.scatter(2, own, -torch.inf).amax(2)  # B x V
    return torch.stack([F.log_softmax(logits.float(), 1).gather(1, y[:, None])[:, 0], margin.amin(1)], 1)


def reference_rank(score, labels, real):
    """[N]: per sample, the share of its class's real samples that score lower. The real images are the reference:
    flagging ranks below q flags about q of anything drawn like them, whatever the model."""
    rank = torch.zeros_like(score)
    for c in labels.unique():
        of_c = labels == c
        ref = score[of_c & real].sort().values
        rank[of_c] = torch.searchsorted(ref, score[of_c]).float() / max(len(ref), 1)
    return rank


def audit_ranks(scores, labels, real):
    """[N, 3] reference ranks of the scores p, margin and both (the sum of the first two ranks), host tensors."""
    r = [reference_rank(s.contiguous(), labels, real) for s in scores.T]
    return torch.stack(r + [reference_rank(r[0] + r[1], labels, real)], 1)


def auc(score, positive):
    """The chance that a positive scores above a negative, ties counting half (Mann-Whitney); None without both."""
    s, pos = np.asarray(score, float), np.asarray(positive, bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if not n1 or not n0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, ties averaged
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def audit_figures(scores, ranks, mixed, q, flags):
    """metrics.jsonl's audit fields: per score, the detector figures of flagging a synthetic sample ranked below q
    and the AUC (planted vs clean; of the rank sum for both), and the AUC of the flags the step used this epoch
    (flags [N]: the paper's rule's, or the audit's with --relabel audit); per class, the 10/50/90% points of log p
    and margin for real, clean and planted samples."""
    syn, noisy, y = mixed.is_syn, mixed.is_noisy, mixed.labels
    raw = torch.cat([scores, (ranks[:, 0] + ranks[:, 1])[:, None]], 1).numpy()
    fig = {name: {**detector(syn & (ranks[:, k] < q).numpy(), mixed), "auc": auc(-raw[syn, k], noisy[syn])}
           for k, name in enumerate(AUDIT_SCORES)}
    fig["flags"] = {"auc": auc(flags[syn], noisy[syn])}
    groups = {"real": ~syn, "clean": syn & ~noisy, "planted": noisy}
    fig["per_class"] = {name: {g: [np.quantile(raw[m & (y == c), k], [0.1, 0.5, 0.9]).round(4).tolist()
                                   if (m & (y == c)).any() else None for c in range(len(mixed.classes))]
                               for g, m in groups.items() if m.any()} for k, name in enumerate(("p", "margin"))}
    return fig


# ---------------------------------------------------------------- the run

def cpu_has_bf16():
    """Native bf16 arithmetic (AVX512-BF16 or AMX): without it bf16 autocast on a CPU is emulated and slower."""
    flags = open("/proc/cpuinfo").read() if os.path.isfile("/proc/cpuinfo") else ""
    return " avx512_bf16" in flags or " amx_bf16" in flags


def config_diff(a, b, ignore=()):
    """The settings that shape the results and differ between two configs; a setting newer than a run had its
    default there."""
    defaults = {k: s.default for k, s in CONFIG.items()}
    a, b = {**defaults, **a}, {**defaults, **b}
    return [k for k, s in CONFIG.items() if s.scope == "run" and k not in ignore and a[k] != b[k]]


def load_checkpoint(out, cfg=None):
    """The run's checkpoint, or None where the run has none yet (killed in its first epoch); given cfg, refused if
    the run was made with settings that shape the results otherwise."""
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle: the same message
        raise data.SAUError(f"checkpoint {path} is unreadable ({e.__class__.__name__}): delete it and start again")
    diff = config_diff(ckpt["config"], cfg) if cfg else []
    if diff:
        raise data.SAUError(f"checkpoint {path} was made with another config: " + ", ".join(
            f"--{k.replace('_', '-')} {ckpt['config'].get(k, CONFIG[k].default)} (now {cfg[k]})" for k in diff)
            + "; resume with the same flags or start a new --out")
    return ckpt


def check_finite(bad_step, epoch, out, model=None):
    """Stop at a non-finite loss (bad_step: its first step, or -1) or, given the model, at non-finite weights: what
    is saved is always finite."""
    step = bad_step.item()
    if step < 0 and (model is None or torch.stack([t.isfinite().all() for t in model.state_dict().values()
                                                   if t.is_floating_point()]).all().item()):
        return
    what = f"loss at epoch {epoch + 1}, step {step}" if step >= 0 else f"weights after epoch {epoch + 1}"
    kept = f"epoch {epoch}" if epoch else "none yet"
    raise data.SAUError(f"non-finite {what}: stopped; the last good checkpoint ({kept}) is kept in {out}; try a lower "
                        f"--lr")


def own(out):
    """Hold out/lock while this process lives: a second run on the folder is refused. The kernel drops the lock when
    the process ends, however it ends, so a killed run blocks nothing; the pid it wrote names it."""
    f = open(os.path.join(data.writable_folder(out, "--out"), "lock"), "a+")
    f.seek(0)
    holder = f.read().strip()
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise data.SAUError(f"{out} is in use by another run ({holder or 'starting'}): wait for it to end, or pass "
                            f"another --out") from None
    if holder:
        print(f"{out}: the run that held it ({holder}) ended without releasing it (killed?); taking it over")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    for tmp in glob.glob(os.path.join(out, "*.tmp")):  # half-written files of a killed run
        os.remove(tmp)
    return f


def setup(cfg):
    """Everything a run holds before its first step: processes, device, data, model, optimiser, the step."""
    # WORLD_SIZE and RANK are set by torchrun
    run = argparse.Namespace(world=int(os.environ.get("WORLD_SIZE", 1)), rank=int(os.environ.get("RANK", 0)))
    device = data.pick_device(cfg["device"])
    if run.world > 1 and cfg["batch_size"] % run.world:
        raise data.SAUError(f"--batch-size {cfg['batch_size']} does not split over {run.world} processes")
    if run.world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":  # pinned memory, cuDNN handles and stray allocations go to this GPU, not GPU 0
        torch.cuda.set_device(device)
    if cfg["sync_bn"] == "on" and device.type != "cuda":
        raise data.SAUError("--sync-bn on needs CUDA (torch's SyncBatchNorm runs on GPUs only): drop it on a CPU")
    if run.world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    run.device = device
    run.amp = cfg["amp"] == "bf16" or (cfg["amp"] == "auto" and (device.type == "cuda" or cpu_has_bf16()))
    run.loader = cfg["loader"] if cfg["loader"] != "auto" else "gpu" if device.type == "cuda" else "cpu"
    workers = cfg["workers"] if cfg["workers"] >= 0 else 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)
    fmt = torch.channels_last if cfg["channels_last"] == "on" else torch.contiguous_format
    run.prep = lambda x: x.to(device, non_blocking=True).contiguous(memory_format=fmt)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg["deterministic"] == "on":  # cuDNN and cuBLAS pick deterministic kernels; an op that has none warns
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any matmul
        torch.use_deterministic_algorithms(True, warn_only=True)

    run.mixed = data.build_mixed(**{k: cfg[k] for k in data.DATA_CONFIG})
    real = torch.from_numpy(np.flatnonzero(~run.mixed.is_syn))[run.rank::run.world]  # this process's real images
    run.real_share = real.to(device) if run.loader == "gpu" else real.tolist()  # copied once, not every epoch
    run.batches = data.batch_maker(run.mixed, run.loader, device, workers)
    x_test, y_test = data.load_cifar(cfg["dataset"], cfg["data_root"], train=False)
    run.x_test, run.y_test = torch.from_numpy(x_test).permute(0, 3, 1, 2), torch.from_numpy(y_test)
    host_view = torch.from_numpy(run.mixed.images).permute(0, 3, 1, 2)  # no copy
    run.x_train = getattr(run.batches, "images", host_view)  # for the audit: --loader gpu's device copy, else the view
    run.y_train = torch.from_numpy(run.mixed.labels).to(device)
    run.mean, run.std = (torch.tensor(s, device=device)[:, None, None] for s in data.MEAN_STD[cfg["dataset"]])

    torch.manual_seed(cfg["seed"])
    run.model = model = resnet32(len(run.mixed.classes), cfg["width"]).to(device, memory_format=fmt)
    if cfg["compile"] == "on":  # the backbone only: the heads are small and the loss has masks, not shapes
        model.features = torch.compile(model.features)
    run.opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                              weight_decay=cfg["weight_decay"])
    run.sched = torch.optim.lr_scheduler.CosineAnnealingLR(run.opt, T_max=cfg["epochs"])
    run.use_cls, run.use_con = cfg["w_cls"] > 0, cfg["w_con"] > 0
    run.step_fn = Step(model, cfg, *(torch.tensor(n, device=device) for n in (run.mixed.n_real, run.mixed.n_syn)))
    if run.world > 1:
        if cfg["sync_bn"] == "on":
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        run.step_fn = torch.nn.parallel.DistributedDataParallel(
            run.step_fn, find_unused_parameters=not (run.use_cls and run.use_con))
    return run


def streams(run, cfg, epoch_seed):
    views_a = (("v1",) if run.use_cls else ()) + (("v2", "v3") if run.use_con else ())
    return data.train_streams(run.mixed, cfg["batch_size"], epoch_seed, views_a, run.use_cls, run.rank, run.world,
                              run.batches)


def step_inputs(run, cfg, a, b, rng, protos, epoch=0, suspects=None):
    """The step's Batch from one (A, B) pair of batches: mixup and cutmix of A's v1 with B's, on the device.
    suspects [N] bool: the epoch audit's flags over the mixed set (--relabel audit)."""
    *va, ya, syn, index = a
    ya, syn, index = (t.to(run.device, non_blocking=True) for t in (ya, syn, index))
    va = [run.prep(v) for v in va]
    x_mix = t_mix = x_cut = t_cut = None
    if run.use_cls:
        classes = torch.arange(len(run.mixed.classes), device=run.device)
        xa, xb = va[0], run.prep(b[0])
        ta = (ya[:, None] == classes).float()  # one-hot without F.one_hot's range check, a device sync
        tb = (b[1].to(run.device, non_blocking=True)[:, None] == classes).float()
        lam = rng.beta(cfg["mix_alpha"], cfg["mix_alpha"])
        x_mix, t_mix = lam * xa + (1 - lam) * xb, lam * ta + (1 - lam) * tb
        x_cut, w = cutmix(xa, xb, rng.beta(cfg["mix_alpha"], cfg["mix_alpha"]), rng)
        t_cut = w * ta + (1 - w) * tb
    v2, v3 = va[-2:] if run.use_con else (None, None)
    suspect = suspects[index] if suspects is not None and run.use_con else None
    keep = None
    if suspects is not None and run.use_cls and cfg["audit_cls"] == "on":
        keep = (~(suspects[index] | suspects[b[-1].to(run.device, non_blocking=True)])).float()
    return Batch(x_mix, t_mix, x_cut, t_cut, v2, v3, ya, syn.bool(), index, protos, epoch, suspect, keep)


def train_step(run, batch, flagged):
    """Forward, backward, SGD step (the model in train mode); adds the batch's suspects to flagged [N] (epochs each
    sample was a suspect); returns [loss, cls, con] on the device, without a sync."""
    with torch.autocast(run.device.type, torch.bfloat16, enabled=run.amp):
        loss, loss_cls, loss_con, suspect = run.step_fn(batch)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    flagged.index_add_(0, batch.index, (suspect & batch.is_syn).int())
    return torch.stack([loss.detach(), loss_cls.detach(), loss_con.detach()]).float()


# ---------------------------------------------------------------- detectors: the relabel rule, the audit (ours)

def detector(flag, mixed):
    """Per-sample flags [N] bool (host) as a detector of bad synthetic images: the share of synthetic samples flagged,
    overall and per class, and with planted images recall, false-flag rate and precision."""
    syn, noisy, y = mixed.is_syn, mixed.is_noisy, mixed.labels
    share = lambda of, m: float(of[m].mean()) if m.any() else None
    fig = {"suspect_frac": share(flag, syn),
           "suspect_frac_per_class": [share(flag, syn & (y == c)) for c in range(len(mixed.classes))]}
    if noisy.any():
        fig.update(recall=share(flag, noisy), false_flag_rate=share(flag, syn & ~noisy),
                   precision=share(noisy, syn & flag))
    return fig


def train(cfg):
    """The run in its folder. checkpoint.pt is the folder's state: it holds all that the next epoch and the reports
    need (weights, optimiser, schedule, epoch, config, metrics, last evaluation, suspect counts) and is replaced in one
    rename per epoch; config.json, metrics.jsonl, final.json and the pictures are derived from it, and rebuilt by
    --resume, so a kill at any instant leaves a folder that --resume finishes."""
    out = cfg["out"] or os.path.join("runs", run_name(cfg))
    main_proc = int(os.environ.get("RANK", 0)) == 0
    lock = own(out) if main_proc else None
    data.INTERRUPTED = f"the last finished epoch is kept: continue with python train.py --resume {out}"
    try:
        return run_epochs(cfg, out, main_proc)
    finally:
        if lock:  # a clean end (an error included) leaves an empty lock file; a killed run leaves its pid
            lock.truncate(0)
            lock.close()


def run_epochs(cfg, out, main_proc):
    if not cfg["resume"] and os.path.exists(os.path.join(out, "checkpoint.pt")):
        raise data.SAUError(f"{out} already holds a run: continue it with --resume {out}, or pass a new --out")
    ckpt = load_checkpoint(out, cfg) if cfg["resume"] else None
    run = setup(cfg)
    world, device, model, mixed = run.world, run.device, run.model, run.mixed
    say = print if main_proc else (lambda *a, **k: None)
    metrics, start, ev = [], 0, None
    flagged = torch.zeros(len(mixed), dtype=torch.int32, device=device)  # epochs each sample was a suspect
    flagged_all = flagged.cpu().clone()  # summed over processes, on the host
    protos, scores, audit_on = None, None, run.use_con and mixed.is_syn.any()
    suspects = torch.zeros(len(mixed), dtype=torch.bool)  # the audit's flags for the next epoch (none in the first)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        run.opt.load_state_dict(ckpt["optimizer"])
        run.sched.load_state_dict(ckpt["scheduler"])
        start, flagged_all = ckpt["epoch"], ckpt["flagged"]
        if main_proc:  # the saved counts are summed over processes: keep them once
            flagged += flagged_all.to(device)
        metrics, ev, scores, suspects = ckpt["metrics"], ckpt["eval"], ckpt.get("audit"), ckpt.get("suspects", suspects)
    if main_proc:
        data.write_atomic(os.path.join(out, "config.json"), json.dumps(
            {k: v for k, v in cfg.items() if k != "resume"}, indent=1))
        data.write_atomic(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in metrics))
    counts = {"n_real": mixed.n_real, "n_syn": mixed.n_syn, "classes": mixed.classes}
    kept = " ".join(f"--{k.replace('_', '-')} {cfg[k]}" for k, s in CONFIG.items()
                    if s.scope == "runtime" and k != "data_root" and cfg[k] != s.default) or "the defaults"
    say(f"{out}: {len(mixed)} training images ({sum(mixed.n_real)} real, {sum(mixed.n_syn)} synthetic), "
        f"{len(mixed.classes)} classes, {device}{' bf16' if run.amp else ''}, loader {run.loader}"
        f"{f' x {world} processes' if world > 1 else ''}, " + (f"epochs {start + 1}-{cfg['epochs']}" if start < cfg[
            "epochs"] else f"all {start} epochs done: its files are rebuilt from the checkpoint")
        + (f"; resumed, runtime settings (the run's unless given now): {kept}" if cfg["resume"] else ""), flush=True)

    for epoch in range(start, cfg["epochs"]):
        if cfg["stop_after"] and epoch >= cfg["stop_after"]:
            say(f"stopping after epoch {epoch} (--stop-after); continue with --resume {out}")
            return out
        # every random draw of an epoch follows from (seed, epoch): a resumed run repeats it exactly
        epoch_seed = cfg["seed"] * 1_000_003 + epoch
        rng = np.random.default_rng(data.stream_seed(epoch_seed, "mix"))  # mixup and cutmix draws
        t0 = time.time()
        given = suspects.to(device) if cfg["relabel"] == "audit" else None  # the previous audit's flags
        if run.use_con and protos is None:  # after the first epoch: made by the previous epoch's audit
            protos = prototypes(run, data.stream_seed(epoch_seed, "prototypes"))
        model.train()
        lr = run.opt.param_groups[0]["lr"]
        sums = torch.zeros(3, device=device)  # loss, cls, con
        bad_step = torch.full((), -1, device=device)  # the first step with a non-finite loss, found without a sync
        n_seen = 0
        bar = tqdm(total=len(mixed), unit="img", desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False,
                   dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30, disable=not main_proc)
        for step, (a, b) in enumerate(streams(run, cfg, epoch_seed)):
            parts = train_step(run, step_inputs(run, cfg, a, b, rng, protos, epoch, given), flagged)
            sums += parts
            bad_step.masked_fill_((bad_step < 0) & ~torch.isfinite(parts[0]), step + 1)
            n_seen += len(a[-1]) * world
            bar.update(len(a[-1]) * world)
            if step % 20 == 0:  # .item() syncs the device: only now and then
                check_finite(bad_step, epoch, out)
                bar.set_postfix(loss=f"{parts[0].item():.3f}")
        check_finite(bad_step, epoch, out, model)
        bar.close()
        run.sched.step()
        train_s = time.time() - t0
        ev = {**evaluate(run), **counts}
        steps = step + 1
        loss_sum, cls_sum, con_sum = all_sum(sums, world).tolist()
        flagged_all, before = all_sum(flagged.clone(), world).cpu(), flagged_all
        epoch_flags = (flagged_all - before).numpy() > 0
        audited, t1 = {}, time.time()
        protos = prototypes(run, data.stream_seed(epoch_seed + 1, "prototypes")) if run.use_con else None  # the next
        if audit_on:  # epoch's, the same as it would make itself (same weights, same seed), and the audit's
            scores = audit(run, protos).cpu()
            ranks = audit_ranks(scores, torch.from_numpy(mixed.labels), torch.from_numpy(~mixed.is_syn))
            suspects = (ranks[:, AUDIT_SCORES.index(cfg["audit_score"])] < cfg["audit_q"]) & torch.from_numpy(
                mixed.is_syn)
            fig = audit_figures(scores, ranks, mixed, cfg["audit_q"], epoch_flags)
            audited = {**{f"auc_{k}": fig[k]["auc"] for k in (*AUDIT_SCORES, "flags")}, "audit": fig,
                       "audit_s": time.time() - t1}
        metrics.append({"epoch": epoch + 1, "lr": lr, "loss": loss_sum / world / steps,
                        "loss_cls": cls_sum / world / steps, "loss_con": con_sum / world / steps,
                        "suspect_frac": None, **(detector(epoch_flags, mixed) if run.use_con else {}),
                        **{k: ev[k] for k in ("top1", "top5", "many", "medium", "few")},
                        "seconds": time.time() - t0, "images_per_s": n_seen / train_s, **audited})
        if not main_proc:
            continue
        print_epoch(metrics[-1], cfg["epochs"])
        state = {"model": model.state_dict(), "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                 "epoch": epoch + 1, "config": cfg, "flagged": flagged_all, "metrics": metrics, "eval": ev,
                 "audit": scores, "suspects": suspects}
        data.write_atomic(os.path.join(out, "checkpoint.pt"), lambda p: torch.save(state, p))  # the one step
        data.write_atomic(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in metrics))
    if main_proc:
        report(out, cfg, metrics, ev, mixed, flagged_all.numpy(), scores)
    return out


def print_epoch(m, epochs):
    fmt = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"
    found = "" if m["suspect_frac"] is None else f"  suspects {fmt(m['suspect_frac'], 3)}" + (
        f" (planted: recall {fmt(m['recall'], 3)}, false flags {fmt(m['false_flag_rate'], 3)}, precision "
        f"{fmt(m['precision'], 3)})" if "recall" in m else "")
    audit = ""
    if "audit" in m:  # ours
        a = m["audit"]
        audit = "\n  audit" + "".join(f"  {k}: flags {fmt(a[k]['suspect_frac'], 3)}" + (
            f" (recall {fmt(a[k]['recall'], 3)}, precision {fmt(a[k]['precision'], 3)}, AUC {fmt(a[k]['auc'], 3)})"
            if "recall" in a[k] else "") for k in AUDIT_SCORES) + (f"  step's flags AUC {fmt(a['flags']['auc'], 3)}"
                                                                   if a["flags"]["auc"] is not None else "") + (
            f"  {m['audit_s']:.0f}s")
    tqdm.write(f"epoch {m['epoch']}/{epochs}  loss {m['loss']:.3f} (cls {m['loss_cls']:.3f} con "
               f"{m['loss_con']:.3f})  lr {m['lr']:.4g}  top1 {m['top1']:.2f}  many/med/few {fmt(m['many'])}/"
               f"{fmt(m['medium'])}/{fmt(m['few'])}{found}  {m['seconds']:.0f}s  {m['images_per_s']:.0f} img/s{audit}")


def report(out, cfg, metrics, ev, mixed, flagged, scores):
    """final.json and the pictures of a finished run, from what its checkpoint holds."""
    best = max(metrics, key=lambda r: r["top1"])
    final = {"final_epoch": {k: ev[k] for k in ("top1", "top5", "many", "medium", "few", "per_class")},
             "epochs": cfg["epochs"], "seed": cfg["seed"], "data_seed": cfg["data_seed"],
             "best_over_epochs_selected_on_test_set": {"top1": best["top1"], "epoch": best["epoch"]},
             "seconds_per_epoch": sum(r["seconds"] for r in metrics) / len(metrics),
             "images_per_s": sum(r["images_per_s"] for r in metrics) / len(metrics),
             "detector_last_epoch": {k: metrics[-1].get(k) for k in ("suspect_frac", "recall", "false_flag_rate",
                                                                     "precision") if k in metrics[-1]},
             "audit_last_epoch": {k: v for k, v in metrics[-1].get("audit", {}).items() if k != "per_class"}}
    plot_run(out, metrics, ev)
    if cfg["w_con"] > 0 and mixed.is_syn.any():
        plot_suspects(out, mixed, flagged, cfg["epochs"])
    if scores is not None:
        plot_audit(out, mixed, scores.numpy(), cfg["epochs"])
    data.write_atomic(os.path.join(out, "final.json"), json.dumps(final, indent=1))  # last: the run's end mark
    f = final["final_epoch"]
    print(f"final (epoch {cfg['epochs']}): top1 {f['top1']:.2f}  top5 {f['top5']:.2f}  many/medium/few "
          + "/".join("-" if f[g] is None else f"{f[g]:.2f}" for g in ("many", "medium", "few"))
          + f"  (best over epochs, selected on the test set: {best['top1']:.2f} at epoch {best['epoch']})  -> {out}")


# ---------------------------------------------------------------- --bench and reports

def bench(cfg, warmup=3):
    """Time cfg["bench"] steps after warm-up with the run's flags: whole step, data path alone, forward-only (the
    prototype and test passes), peak memory, host syncs (CUDA), the projected full schedule. Writes nothing."""
    run = setup(cfg)
    n, device, mixed, cuda = cfg["bench"], run.device, run.mixed, run.device.type == "cuda"
    warmup += 7 * (cfg["compile"] == "on")  # compilation, and a recompilation for the eval graph
    rng, sync = np.random.default_rng(0), (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    protos = F.normalize(torch.randn(len(mixed.classes), 2, run.model.proj[-1].out_features, device=device), dim=-1)
    flagged = torch.zeros(len(mixed), dtype=torch.int32, device=device)

    def timed(batches, work):  # seconds per batch over n batches after warm-up
        it = iter(batches)
        for i in range(warmup + n):
            if i == warmup:
                sync()
                t = time.perf_counter()
            work(next(it))
        sync()
        return (time.perf_counter() - t) / n

    epochs = lambda: (ab for e in itertools.count() for ab in streams(run, cfg, e))  # as many steps as asked for
    with warnings.catch_warnings(record=True) as syncs:  # CUDA: every host sync inside a step warns once
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn") if cuda else None
        step_s = timed(epochs(), lambda ab: train_step(run, step_inputs(run, cfg, *ab, rng, protos), flagged))
        torch.cuda.set_sync_debug_mode("default") if cuda else None
    syncs = sum("synchroniz" in str(w.message) for w in syncs) if cuda else None
    data_s = timed(epochs(), lambda ab: step_inputs(run, cfg, *ab, rng, protos))
    real = np.flatnonzero(~mixed.is_syn).tolist() * (1 + (warmup + n) * 256 // max(len(mixed.n_real), 1))
    run.model.eval()
    with torch.no_grad():  # a prototype batch: two views through backbone and projection head
        proto_s = timed(run.batches(("v2", "v3"), 256, 0, real), lambda batch: project_views(run, *batch[:2]))
    bs, steps = cfg["batch_size"] // run.world, math.ceil(len(mixed) / cfg["batch_size"])
    # per epoch: the steps, the prototypes (real images, two views, batches of 256), the test set (one view, ~ half)
    epoch_s = steps * step_s + (math.ceil(sum(mixed.n_real) / 256) * run.use_con + len(run.y_test) / 512) * proto_s
    import resource
    peak = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on the GPU" if cuda else
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (host)")
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    res = {"device": name, "loader": run.loader, "amp": "bf16" if run.amp else "off", "width": cfg["width"],
           "batch_size": bs, "channels_last": cfg["channels_last"], "compile": cfg["compile"], "steps_timed": n,
           "step_images_per_s": bs / step_s, "data_images_per_s": bs / data_s, "data_fraction": data_s / step_s,
           "forward_images_per_s": 2 * 256 / proto_s, "epoch_s": epoch_s, "run_s": epoch_s * cfg["epochs"],
           "peak": peak, "host_syncs_in_timed_steps": syncs}
    print(f"bench ({name}; loader {run.loader}, amp {res['amp']}, channels_last {cfg['channels_last']}, compile "
          f"{cfg['compile']}, width {cfg['width']}, batch {bs}; {n} steps after {warmup} warm-up):\n"
          f"  whole step      {bs / step_s:8.1f} images/s  ({1000 * step_s:.1f} ms/step)\n"
          f"  data path alone {bs / data_s:8.1f} images/s  ({100 * data_s / step_s:.1f}% of a step)\n"
          f"  prototype/test forward passes {2 * 256 / proto_s:.1f} images/s; peak memory {peak}; host syncs in the "
          f"timed steps: {'-' if syncs is None else syncs}\n  projected: {epoch_s:.1f} s per epoch, {cfg['epochs']} "
          f"epochs {epoch_s * cfg['epochs'] / 60:.1f} min ({steps} steps, prototypes and test set each epoch)")
    print("bench_json " + json.dumps(res))
    return res


def summarize(dirs, out=""):
    """Mean and standard deviation of the final metrics over runs that differ only in --seed."""
    if len(set(map(os.path.realpath, dirs))) < len(dirs):
        raise data.SAUError("--summarize names a run twice: each run once")
    runs, keys = [], ("top1", "top5", "many", "medium", "few")
    for d in dirs:
        if not os.path.isfile(os.path.join(d, "config.json")):
            raise data.SAUError(f"{d} is not a run folder (no config.json)")
        if not os.path.isfile(os.path.join(d, "final.json")):
            raise data.SAUError(f"{d} has no final.json: the run did not finish (continue it with --resume {d})")
        cfg, final = read_json(os.path.join(d, "config.json")), read_json(os.path.join(d, "final.json"))
        try:
            values = {k: final["final_epoch"][k] for k in keys}
            finite = all(v is None or math.isfinite(v) for v in values.values())
        except (KeyError, TypeError) as e:
            raise data.SAUError(f"{d}: final.json is malformed ({e.__class__.__name__}): leave it out") from None
        if not finite:  # an explicit check, not an assert: python -O would drop it
            raise data.SAUError(f"{d}: its final metrics are not finite: leave it out")
        runs.append((d, cfg, values))
    ref = runs[0][1]
    for d, c, _ in runs[1:]:
        diff = config_diff(ref, c, ignore={"seed"})
        if diff:
            raise data.SAUError(f"{d} differs from {runs[0][0]} in " + ", ".join(f"--{k.replace('_', '-')}" for k in diff)
                                + ": summarize runs that differ only in --seed")
    if len({c.get("seed") for _, c, _ in runs}) < len(runs):
        raise data.SAUError("--summarize: two of these runs have the same --seed (the same run twice?)")
    table = {k: np.array([f[k] for _, _, f in runs if f[k] is not None], float) for k in keys}
    table = {k: {"mean": v.mean(), "std": v.std(ddof=1) if len(v) > 1 else 0.0, "runs": len(v)}
             for k, v in table.items() if len(v)}
    name = run_name({**{k: s.default for k, s in CONFIG.items()}, **ref}, seed=False)
    lines = [f"{name}: final-epoch test accuracy (%), {ref['epochs']} epochs, seeds "
             f"{', '.join(str(c['seed']) for _, c, _ in runs)}, mean ± std over {len(runs)} runs",
             "| " + " | ".join(table) + " |", "|" + "---|" * len(table),
             "| " + " | ".join(f"{t['mean']:.2f} ± {t['std']:.2f}" for t in table.values()) + " |"]
    print("\n".join(lines))
    path = out or os.path.join("runs", f"summary_{name}")
    data.writable_folder(os.path.dirname(path) or ".", "--out")
    data.write_atomic(path + ".md", "\n".join(lines) + "\n")
    data.write_atomic(path + ".json", json.dumps({"runs": dirs, "config": ref, "final_epoch": table}, indent=1))
    print(f"written: {path}.md, {path}.json")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    fig.tight_layout()
    data.write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    pyplot().close(fig)


def plot_run(out, metrics, ev):
    """curves.png, per_class.png and confusion.png in the run folder."""
    plt, ep = pyplot(), [r["epoch"] for r in metrics]
    panels = [("loss", "loss_cls", "loss_con"), ("lr",), ("top1", "many", "medium", "few"),
              ("suspect_frac", "recall", "false_flag_rate", "precision"), ("auc_p", "auc_margin", "auc_both",
                                                                           "auc_flags")]
    titles = ["training loss", "learning rate", "test accuracy (%)", "the step's suspects among synthetic samples",
              "audit AUC, planted vs clean"]
    shown = [i for i, keys in enumerate(panels) if any(r.get(keys[0]) is not None for r in metrics)]
    fig, ax = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4))
    for a, keys, title in zip(ax, [panels[i] for i in shown], [titles[i] for i in shown]):
        for k in keys:
            if any(r.get(k) is not None for r in metrics):  # many/medium/few: only the groups that have classes
                a.plot(ep, [np.nan if r.get(k) is None else r[k] for r in metrics], ".-", label=k)
        a.set(title=title, xlabel="epoch")
        a.set_xticks(ep) if len(ep) <= 20 else None
        a.legend() if len(keys) > 1 and a.get_legend_handles_labels()[0] else None
    save_figure(fig, os.path.join(out, "curves.png"))

    c, small = np.arange(len(ev["per_class"])), len(ev["per_class"]) <= 20
    colors = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    fig, ax = plt.subplots(figsize=(max(8, len(c) * 0.12 + 4), 4))
    ax.bar(c, ev["per_class"], color=[colors[data.shot_group(n)] for n in ev["n_real"]])
    ax.set(xlabel="class (label order: head to tail)", ylabel="test accuracy (%)", ylim=(0, 100),
           title="per-class accuracy; bars coloured many / medium / few; lines: train images per class")
    ax.set_xticks(c, ev["classes"], rotation=45, ha="right") if small else None
    tw = ax.twinx()
    tw.plot(c, ev["n_real"], "k.-", label="real")
    tw.plot(c, ev["n_syn"], "g.--", label="synthetic")
    tw.set(ylabel="train images", yscale="symlog")
    tw.legend(loc="upper right")
    save_figure(fig, os.path.join(out, "per_class.png"))

    cm = np.asarray(ev["confusion"], float)
    fig, ax = plt.subplots(figsize=(7, 6))
    fig.colorbar(ax.imshow(cm / cm.sum(1, keepdims=True).clip(min=1), cmap="Blues", vmin=0, vmax=1))
    ax.set(xlabel="predicted", ylabel="true", title="confusion (rows normalised)")
    if small:
        ax.set_xticks(c, ev["classes"], rotation=45, ha="right")
        ax.set_yticks(c, ev["classes"])
    save_figure(fig, os.path.join(out, "confusion.png"))


def plot_audit(out, mixed, scores, epochs):
    """audit.png: the last epoch's audit scores, real, clean synthetic and planted samples apart."""
    plt, syn, noisy = pyplot(), mixed.is_syn, mixed.is_noisy
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for a, s, title in zip(ax, scores.T, ("log p(label), classifier, plain image", "prototype margin")):
        bins = np.linspace(np.quantile(s, 0.005), s.max(), 60)
        for name, m in [("real", ~syn), ("synthetic, clean", syn & ~noisy), ("synthetic, planted", noisy)]:
            if m.any():
                a.hist(s[m].clip(bins[0]), bins, density=True, histtype="step", lw=1.5, label=f"{name} ({m.sum()})")
        a.set(title=title, xlabel="score (lower: less like its class)", ylabel="density")
        a.legend()
    fig.suptitle(f"epoch audit after epoch {epochs} (the lowest 0.5% piled into the first bin)", fontsize=10)
    save_figure(fig, os.path.join(out, "audit.png"))


def plot_suspects(out, mixed, flagged, epochs, per_side=8):
    """suspects.png: per class (every tenth beyond 20 classes), the synthetic images taken as suspects in the most
    epochs and those in the fewest, each with its count; planted wrong-class images outlined in red."""
    plt, num_classes = pyplot(), len(mixed.classes)
    shown = [c for c in range(num_classes) if num_classes <= 20 or c % 10 == 0]
    m, text = 3, 11  # margin for the outline, band below each image for its count
    s, cols = 32 + 2 * m, 2 * per_side + 1  # a blank column between the two sides
    mosaic = np.full((len(shown) * (s + text), cols * s, 3), 255, np.uint8)
    fig, ax = plt.subplots(figsize=(cols * s / 50, len(shown) * (s + text) / 50 + 0.9))
    order = np.random.default_rng(0).permutation(len(mixed))  # ties broken at random, the same in every run
    for r, c in enumerate(shown):
        syn, y0 = order[mixed.is_syn[order] & (mixed.labels[order] == c)], r * (s + text)
        if not len(syn):
            ax.text(cols * s / 2, y0 + s / 2, "no synthetic images", ha="center", va="center", fontsize=8)
        most = syn[np.argsort(-flagged[syn], kind="stable")[:per_side]]
        fewest = syn[np.argsort(flagged[syn], kind="stable")[:per_side]]
        for col, i in [*enumerate(most), *((per_side + 1 + k, i) for k, i in enumerate(fewest))]:
            x0 = col * s
            mosaic[y0 + m:y0 + m + 32, x0 + m:x0 + m + 32] = mixed.images[i]
            if mixed.is_noisy[i]:
                ax.add_patch(plt.Rectangle((x0 + 0.5, y0 + 0.5), s - 2, s - 2, fill=False, edgecolor="red", lw=1.5))
            ax.text(x0 + s / 2, y0 + s + text / 2, f"{flagged[i]}/{epochs}", ha="center", va="center", fontsize=6)
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([r * (s + text) + s / 2 for r in range(len(shown))], [mixed.classes[c] for c in shown])
    ax.set_xticks([per_side * s / 2, (per_side + 1 + per_side / 2) * s],
                  ["taken as suspect in the most epochs", "in the fewest"])
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    fig.suptitle(f"synthetic images per class, each with the epochs (of {epochs}) it was taken as a suspect; "
                 f"red: a planted wrong-class image", fontsize=9)
    for side in ax.spines.values():
        side.set_visible(False)
    save_figure(fig, os.path.join(out, "suspects.png"))


def main():
    cfg = get_config()
    runs = cfg.pop("summarize", None)
    if runs:
        return summarize(runs, cfg["out"])
    bench(cfg) if cfg["bench"] else train(cfg)


if __name__ == "__main__":
    data.run_cli(main)
