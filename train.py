"""SAU training: one ResNet-32, a synthetic-unaware classifier and a synthetic-aware contrastive branch.

    python train.py --dataset cifar10 --imb 100                 # SAU.md defaults, writes runs/<name>/
    python train.py --dataset cifar10 --imb 100 --syn none      # the long-tailed baseline
    python train.py --resume runs/<name>                        # continue a killed run
"""
import argparse
import itertools
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from model import resnet32

# Every setting, its default and what it does. The paper's value unless marked (ours).
CONFIG = {
    "dataset": ("cifar10", "cifar10 | cifar100"),
    "imb": (100.0, "imbalance factor: head / tail real images"),
    "syn": ("pool", "tail fill: pool (generate.py's images) | none (plain long-tailed set) | heldout (unused real images, ours)"),
    "syn_ratio": (1.0, "fraction of each class's synthetic fill that is used"),
    "syn_noise": (0.0, "fraction of each class's fill drawn from the other classes' fill source, keeping its label: "
                       "planted wrong-class images that measure the relabel rule as a detector (ours)"),
    "pool": ("", "synthetic pool folder; empty: <data-root>/synthetic/<dataset>"),
    "data_root": ("./data", "folder holding the CIFAR python-layout files"),
    "data_seed": (0, "seed of the long-tailed subset and the synthetic draw"),
    "w_cls": (1.0, "weight of the classification branch (mixup + cutmix); 0 skips it"),
    "w_con": (1.0, "weight of the contrastive branch; 0 skips it and its prototypes"),
    "relabel": ("on", "on: doubtful synthetic samples are relabelled by --strategy | off: all keep their label"),
    "strategy": ("pos_neg", "what suspects become: pos_neg | neg_only | drop"),
    "temperature": (0.1, "contrastive temperature"),
    "mix_alpha": (1.0, "mixup and cutmix lam ~ Beta(alpha, alpha)"),
    "epochs": (200, "epochs, each one pass of stream A"),
    "batch_size": (128, "images per step in each stream"),
    "lr": (0.01, "SGD learning rate, cosine-annealed per epoch to 0"),
    "momentum": (0.9, "SGD momentum"),
    "weight_decay": (5e-3, "SGD weight decay"),
    "width": (64, "ResNet-32 stem width (stages w, 2w, 4w)"),
    "seed": (0, "training seed: init, order, augmentation, mixing"),
    "amp": ("auto", "bf16 autocast: auto (on CUDA, and on a CPU with native bf16) | bf16 | off"),
    "loader": ("auto", "auto (gpu on CUDA, else cpu) | cpu: DataLoader workers + torchvision, as the paper | "
                       "gpu: the set held on the device, views as batched tensor ops (ours)"),
    "device": ("auto", "auto (cuda if present) | cpu | cuda | cuda:N"),
    "workers": (-1, "DataLoader worker processes (--loader cpu); -1: min(8, CPU count)"),
    "channels_last": ("on", "channels_last memory format for the network: on | off (ours)"),
    "compile": ("off", "torch.compile the backbone: on | off (ours)"),
    "deterministic": ("off", "on: deterministic CUDA kernels, so a resumed CUDA run ends with the same weights as an "
                             "uninterrupted one (CPU runs always do); somewhat slower (ours)"),
    "bench": (0, "time this many steps after warm-up with the run's flags, print the figures and exit (ours)"),
    "out": ("", "run folder; empty: runs/<name from the key flags>"),
    "resume": ("", "continue the run in this folder; flags not given are taken from it"),
    "stop_after": (0, "leave after this many epochs in total, checkpoint kept (for time-limited jobs; ours)"),
    "sync_bn": ("off", "with torchrun: off: BatchNorm statistics per process, as the paper | on: over all"),
}
CHOICES = {"dataset": list(data.DATASETS), "syn": list(data.SYN_MODES), "relabel": ["on", "off"],
           "strategy": ["pos_neg", "neg_only", "drop"], "amp": ["auto", "bf16", "off"], "sync_bn": ["on", "off"],
           "loader": ["auto", "cpu", "gpu"], "channels_last": ["on", "off"], "compile": ["on", "off"],
           "deterministic": ["on", "off"]}
# may differ when resuming: results do not depend on them beyond float rounding
RUNTIME = {"device", "workers", "out", "resume", "stop_after", "channels_last", "compile", "bench", "deterministic"}
NAME_KEYS = {"syn_ratio": "r", "syn_noise": "noise", "w_cls": "wcls", "w_con": "wcon", "relabel": "relabel",
             "strategy": "", "width": "w", "epochs": "e", "batch_size": "b", "lr": "lr", "data_seed": "ds"}


def make_parser(with_defaults=True):
    p = data.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                    argument_default=None if with_defaults else argparse.SUPPRESS)
    for key, (default, help) in CONFIG.items():
        kw = dict(default=default) if with_defaults else {}
        p.add_argument("--" + key.replace("_", "-"), type=type(default), choices=CHOICES.get(key), help=help, **kw)
    p.add_argument("--summarize", nargs="+", metavar="RUN", help="mean and std of finished runs' final metrics over "
                   "seeds (writes --out or runs/summary_<name>.md/.json) and exit")
    return p


def get_config(argv=None):
    cfg = vars(make_parser().parse_args(argv))
    if cfg["resume"]:  # unspecified flags come from the run being resumed
        given = vars(make_parser(False).parse_args(argv))
        saved = os.path.join(cfg["resume"], "config.json")
        if not os.path.isfile(saved):
            raise data.SAUError(f"--resume {cfg['resume']}: no config.json there, so no run to continue")
        kept = {k: v for k, v in read_json(saved).items() if k in CONFIG and k not in RUNTIME}
        cfg = {**CONFIG_DEFAULTS, **kept, **given, "out": cfg["resume"]}
    checks = [(cfg["imb"] >= 1, "--imb must be >= 1"), (cfg["syn_ratio"] >= 0, "--syn-ratio must be >= 0"),
              (0 <= cfg["syn_noise"] <= 1, "--syn-noise must be in [0, 1]"),
              (cfg["epochs"] >= 1, "--epochs must be >= 1"), (cfg["batch_size"] >= 2, "--batch-size must be >= 2"),
              (cfg["width"] >= 2 and cfg["width"] % 2 == 0, "--width must be an even number >= 2"),
              (cfg["temperature"] > 0, "--temperature must be > 0"), (cfg["lr"] > 0, "--lr must be > 0"),
              (cfg["bench"] >= 0, "--bench must be >= 0"),
              (min(cfg["w_cls"], cfg["w_con"]) >= 0 and max(cfg["w_cls"], cfg["w_con"]) > 0,
               "--w-cls and --w-con must be >= 0 and not both 0")]
    for ok, msg in checks:
        if not ok:
            raise data.SAUError(msg)
    return cfg


CONFIG_DEFAULTS = {k: v for k, (v, _) in CONFIG.items()}


def run_name(cfg, seed=True):
    parts = [cfg["dataset"], f"imb{cfg['imb']:g}", cfg["syn"]]
    parts += [f"{tag}{cfg[k]:g}" if isinstance(cfg[k], float) else f"{tag}{cfg[k]}"
              for k, tag in NAME_KEYS.items() if cfg[k] != CONFIG_DEFAULTS[k]]
    return "_".join(parts + ([f"s{cfg['seed']}"] if seed else []))


def read_json(path):
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- losses

def soft_ce(logits, targets):
    """Cross-entropy with soft targets: mean_i(-sum_k t_ik log_softmax(o)_ik)."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def supcon(feats, labels, is_anchor, temperature, member=None):
    """Supervised contrastive loss. feats [M, V, D], labels [M], is_anchor [M] bool -> scalar. member [M] bool
    (default all): non-members are no anchor, no positive and in no denominator, as if left out (fixed shapes)."""
    m, v = feats.shape[:2]
    member = torch.ones_like(is_anchor) if member is None else member
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
    sim = torch.einsum("mvd,avd->vma", f, f).masked_fill(~in_anchor_set, -torch.inf)  # V x M x M
    return (labels[sim.argmax(-1)] != labels).any(0)  # V x M -> M


def sau_contrastive_loss(z, labels, is_syn, prototypes, strategy="pos_neg", temperature=0.1, relabel=True,
                         return_suspects=False):
    """SAU.md section 5. z [B, 2, D] unit, labels [B], is_syn [B], prototypes [C, 2, D] -> scalar loss (and the
    suspects, [B] bool). Who takes part is a mask, not a subset, so the step never waits for the host."""
    if strategy not in CHOICES["strategy"]:
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {CHOICES['strategy']}")
    b, c = len(labels), len(prototypes)
    feats = torch.cat([z, prototypes.to(z.dtype)])  # (B + C) x 2 x D
    y = torch.cat([labels, torch.arange(c, device=z.device)])  # B + C
    syn = torch.cat([is_syn.bool(), torch.zeros(c, dtype=torch.bool, device=z.device)])
    suspect = find_suspects(feats, y, ~syn) & syn if relabel else torch.zeros_like(syn)  # anchor set: real + prototypes
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


class Step(torch.nn.Module):
    """The forward passes of one step and their losses, as one module call so that DistributedDataParallel
    sees one forward per backward. Inputs are already mixed; a branch given None is skipped."""

    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, x_mix, t_mix, x_cut, t_cut, v2, v3, y, is_syn, protos):
        m, cfg = self.model, self.cfg
        zero = torch.zeros((), device=y.device)
        loss_cls, loss_con, suspect = zero, zero, torch.zeros_like(is_syn, dtype=torch.bool)
        if x_mix is not None:  # the whole model, as the reference: the projection head's BatchNorm statistics see
            loss_cls = soft_ce(m(x_mix)[0], t_mix) + soft_ce(m(x_cut)[0], t_cut)  # the mixed images too
        if v2 is not None:
            z = torch.stack([m.project(m.features(v2)), m.project(m.features(v3))], 1)  # B x 2 x 128
            loss_con, suspect = sau_contrastive_loss(z, y, is_syn, protos, cfg["strategy"], cfg["temperature"],
                                                     cfg["relabel"] == "on", return_suspects=True)
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
    real = np.flatnonzero(~run.mixed.is_syn)  # the real images come first in the mixed set
    for v2, v3, yb, *_ in run.batches(("v2", "v3"), 256, seed, real[run.rank::run.world].tolist()):
        yb = yb.to(device, non_blocking=True)
        z = project_views(run, v2, v3)
        sums.index_add_(0, yb, z.float())  # C x 2 x D
        counts.index_add_(0, yb, torch.ones_like(yb, dtype=torch.float))
    return all_sum(sums, run.world) / all_sum(counts, run.world).clamp(min=1)[:, None, None]


@torch.no_grad()
def evaluate(run, batch_size=1000):
    """Top-1, top-5, per-class accuracy, many/medium/few and the confusion matrix on the test set."""
    model, device, n_real = run.model, run.device, run.mixed.n_real
    model.eval()
    num_classes = len(n_real)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    top5_hits = torch.zeros((), dtype=torch.long, device=device)
    for i in range(run.rank * batch_size, len(run.y_test), run.world * batch_size):
        x = run.prep((run.x_test[i:i + batch_size].to(device).float() / 255 - run.mean) / run.std)
        y = run.y_test[i:i + batch_size].to(device)
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


# ---------------------------------------------------------------- the run

def cpu_has_bf16():
    """Native bf16 arithmetic (AVX512-BF16 or AMX): without it bf16 autocast on a CPU is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def load_checkpoint(out, cfg):
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        raise data.SAUError(f"--resume {out}: no checkpoint.pt there; start the run again without --resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle: the same message
        raise data.SAUError(f"checkpoint {path} is unreadable ({e.__class__.__name__}): delete it and start again")
    saved = {**CONFIG_DEFAULTS, **ckpt["config"]}  # a flag newer than the run: the run had its default
    diff = [k for k in CONFIG if k not in RUNTIME and saved[k] != cfg[k]]
    if diff:
        raise data.SAUError(f"checkpoint {path} was made with another config: " + ", ".join(
            f"--{k.replace('_', '-')} {saved[k]} (now {cfg[k]})" for k in diff)
            + "; resume with the same flags or start a new --out")
    return ckpt


def check_finite(bad_step, epoch, out):
    if bad_step.item() >= 0:
        raise data.SAUError(f"non-finite loss at epoch {epoch + 1}, step {bad_step.item()}: stopped; the last good "
                            f"checkpoint ({'epoch ' + str(epoch) if epoch else 'none yet'}) is kept in {out}")


def setup(cfg):
    """Everything a run holds before its first step: processes, device, data, model, optimiser, the step."""
    # WORLD_SIZE and RANK are set by torchrun
    run = argparse.Namespace(world=int(os.environ.get("WORLD_SIZE", 1)), rank=int(os.environ.get("RANK", 0)))
    device = data.pick_device(cfg["device"])
    if run.world > 1:
        if cfg["batch_size"] % run.world:
            raise data.SAUError(f"--batch-size {cfg['batch_size']} does not split over {run.world} processes")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    run.device = device
    run.amp = cfg["amp"] == "bf16" or (cfg["amp"] == "auto" and (device.type == "cuda" or cpu_has_bf16()))
    run.loader = cfg["loader"] if cfg["loader"] != "auto" else "gpu" if device.type == "cuda" else "cpu"
    workers = cfg["workers"] if cfg["workers"] >= 0 else min(8, os.cpu_count() or 1)
    fmt = torch.channels_last if cfg["channels_last"] == "on" else torch.contiguous_format
    run.prep = lambda x: x.to(device, non_blocking=True).contiguous(memory_format=fmt)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg["deterministic"] == "on":  # cuDNN and cuBLAS pick deterministic kernels; an op that has none warns
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any matmul
        torch.use_deterministic_algorithms(True, warn_only=True)

    run.mixed = data.build_mixed(cfg["dataset"], cfg["data_root"], cfg["imb"], cfg["data_seed"], cfg["syn"],
                                 cfg["syn_ratio"], cfg["pool"] or None, cfg["syn_noise"])
    run.is_noisy = torch.from_numpy(run.mixed.is_noisy).to(device)
    run.batches = data.batch_maker(run.mixed, run.loader, device, workers)
    x_test, y_test = data.load_cifar(cfg["dataset"], cfg["data_root"], train=False)
    run.x_test, run.y_test = torch.from_numpy(x_test).permute(0, 3, 1, 2), torch.from_numpy(y_test)
    run.mean, run.std = (torch.tensor(s, device=device)[:, None, None] for s in data.MEAN_STD[cfg["dataset"]])

    torch.manual_seed(cfg["seed"])
    run.model = model = resnet32(len(run.mixed.classes), cfg["width"]).to(device, memory_format=fmt)
    if cfg["compile"] == "on":  # the backbone only: the heads are small and the loss has masks, not shapes
        model.features = torch.compile(model.features)
    run.opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                              weight_decay=cfg["weight_decay"])
    run.sched = torch.optim.lr_scheduler.CosineAnnealingLR(run.opt, T_max=cfg["epochs"])
    run.use_cls, run.use_con = cfg["w_cls"] > 0, cfg["w_con"] > 0
    run.step_fn = Step(model, cfg)
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


def step_inputs(run, cfg, a, b, rng, protos):
    """The Step's arguments from one (A, B) pair of batches: mixup and cutmix of A's v1 with B's, on the device."""
    *va, ya, syn, _ = a
    ya, syn = ya.to(run.device, non_blocking=True), syn.to(run.device, non_blocking=True)
    va = [run.prep(v) for v in va]
    x_mix = t_mix = x_cut = t_cut = None
    if run.use_cls:
        num_classes = len(run.mixed.classes)
        classes = torch.arange(num_classes, device=run.device)
        xa, xb = va[0], run.prep(b[0])
        ta = (ya[:, None] == classes).float()  # one-hot without F.one_hot's range check, a device sync
        tb = (b[1].to(run.device, non_blocking=True)[:, None] == classes).float()
        lam = rng.beta(cfg["mix_alpha"], cfg["mix_alpha"])
        x_mix, t_mix = lam * xa + (1 - lam) * xb, lam * ta + (1 - lam) * tb
        x_cut, w = cutmix(xa, xb, rng.beta(cfg["mix_alpha"], cfg["mix_alpha"]), rng)
        t_cut = w * ta + (1 - w) * tb
    v2, v3 = va[-2:] if run.use_con else (None, None)
    return x_mix, t_mix, x_cut, t_cut, v2, v3, ya, syn, protos


def train_step(run, inputs, index, det, flagged):
    """Forward, backward, SGD step (the model in train mode), and the relabel rule's counts for the batch (index:
    its samples in the mixed set); returns [loss, cls, con] on the device, without a sync."""
    with torch.autocast(run.device.type, torch.bfloat16, enabled=run.amp):
        loss, loss_cls, loss_con, suspect = run.step_fn(*inputs)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    index = index.to(run.device, non_blocking=True)
    count_suspects(det, flagged, inputs[-3], inputs[-2], run.is_noisy[index], suspect, index)
    return torch.stack([loss.detach(), loss_cls.detach(), loss_con.detach()]).float()


# ---------------------------------------------------------------- the relabel rule as a detector (ours)

def count_suspects(det, flagged, y, is_syn, is_noisy, suspect, index):
    """Add one batch to the device counts, without a sync. det [C, 4] per class: synthetic seen, flagged, planted
    seen, planted flagged; flagged [N]: in how many epochs each sample of the mixed set was taken as a suspect."""
    s = suspect & is_syn
    det.index_add_(0, y, torch.stack([is_syn, s, is_noisy, is_noisy & s], 1).float())
    flagged.index_add_(0, index, s.int())


def detector_figures(det, planted):
    """metrics.jsonl's detector fields from an epoch's det [C, 4] (host lists): the suspect fraction of synthetic
    samples overall and per class and, with planted images, recall, false-flag rate and precision."""
    seen, flagged, p_seen, p_flagged = (sum(col) for col in zip(*det))
    ratio = lambda a, b: a / b if b else None
    fig = {"suspect_frac": ratio(flagged, seen), "suspect_frac_per_class": [ratio(r[1], r[0]) for r in det]}
    if planted:
        fig.update(recall=ratio(p_flagged, p_seen), false_flag_rate=ratio(flagged - p_flagged, seen - p_seen),
                   precision=ratio(p_flagged, flagged))
    return fig


def train(cfg):
    run = setup(cfg)
    world, rank, device, model, mixed = run.world, run.rank, run.device, run.model, run.mixed
    main_proc = rank == 0
    say = print if main_proc else (lambda *a, **k: None)
    out = cfg["out"] or os.path.join("runs", run_name(cfg))
    if not cfg["resume"] and os.path.exists(os.path.join(out, "checkpoint.pt")):
        raise data.SAUError(f"{out} already holds a run: continue it with --resume {out}, or pass a new --out")
    ckpt = load_checkpoint(out, cfg) if cfg["resume"] else None
    metrics, start = [], 0
    flagged = torch.zeros(len(mixed), dtype=torch.int32, device=device)  # epochs each sample was a suspect
    if ckpt:
        model.load_state_dict(ckpt["model"])
        run.opt.load_state_dict(ckpt["optimizer"])
        run.sched.load_state_dict(ckpt["scheduler"])
        start = ckpt["epoch"]
        if main_proc and "flagged" in ckpt:  # the saved counts are summed over processes: keep them once
            flagged += ckpt["flagged"].to(device)
        metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][:start]
    if main_proc:
        os.makedirs(out, exist_ok=True)
        data.write_atomic(os.path.join(out, "config.json"), json.dumps({k: v for k, v in cfg.items() if k != "resume"},
                                                                  indent=1))
    counts = {"n_real": mixed.n_real, "n_syn": mixed.n_syn, "classes": mixed.classes}
    say(f"{out}: {len(mixed)} training images ({sum(mixed.n_real)} real, {sum(mixed.n_syn)} synthetic), "
        f"{len(mixed.classes)} classes, {device}{' bf16' if run.amp else ''}, loader {run.loader}"
        f"{f' x {world} processes' if world > 1 else ''}, epochs {start + 1}-{cfg['epochs']}", flush=True)

    for epoch in range(start, cfg["epochs"]):
        if cfg["stop_after"] and epoch >= cfg["stop_after"]:
            say(f"stopping after epoch {epoch} (--stop-after); continue with --resume {out}")
            return out
        # every random draw of an epoch follows from (seed, epoch): a resumed run repeats it exactly
        epoch_seed = cfg["seed"] * 1_000_003 + epoch
        rng = np.random.default_rng(data.stream_seed(epoch_seed, "mix"))  # mixup and cutmix draws
        t0 = time.time()
        protos = prototypes(run, data.stream_seed(epoch_seed, "prototypes")) if run.use_con else None
        model.train()
        lr = run.opt.param_groups[0]["lr"]
        sums = torch.zeros(3, device=device)  # loss, cls, con
        det = torch.zeros(len(mixed.classes), 4, device=device)  # per class: synthetic, flagged, planted, both
        bad_step = torch.full((), -1, device=device)  # the first step with a non-finite loss, found without a sync
        n_seen = 0
        bar = tqdm(total=len(mixed), unit="img", desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False,
                   dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30, disable=not main_proc)
        for step, (a, b) in enumerate(streams(run, cfg, epoch_seed)):
            parts = train_step(run, step_inputs(run, cfg, a, b, rng, protos), a[-1], det, flagged)
            sums += parts
            bad_step.masked_fill_((bad_step < 0) & ~torch.isfinite(parts[0]), step + 1)
            n_seen += len(a[-1]) * world
            bar.update(len(a[-1]) * world)
            if step % 20 == 0:  # .item() syncs the device: only now and then
                check_finite(bad_step, epoch, out)
                bar.set_postfix(loss=f"{parts[0].item():.3f}")
        check_finite(bad_step, epoch, out)
        bar.close()
        run.sched.step()
        train_s = time.time() - t0
        ev = evaluate(run)
        steps = step + 1
        loss_sum, cls_sum, con_sum = all_sum(sums, world).tolist()
        detector = detector_figures(all_sum(det, world).tolist(), cfg["syn_noise"] > 0) if run.use_con else {}
        flagged_all = all_sum(flagged.clone(), world).cpu()
        metrics.append({"epoch": epoch + 1, "lr": lr, "loss": loss_sum / world / steps,
                        "loss_cls": cls_sum / world / steps, "loss_con": con_sum / world / steps,
                        "suspect_frac": None, **detector,
                        **{k: ev[k] for k in ("top1", "top5", "many", "medium", "few")},
                        "seconds": time.time() - t0, "images_per_s": n_seen / train_s})
        if not main_proc:
            continue
        m = metrics[-1]
        fmt = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"
        found = "" if m["suspect_frac"] is None else f"  suspects {fmt(m['suspect_frac'], 3)}" + (
            f" (planted: recall {fmt(m['recall'], 3)}, false flags {fmt(m['false_flag_rate'], 3)}, precision "
            f"{fmt(m['precision'], 3)})" if "recall" in m else "")
        tqdm.write(f"epoch {epoch + 1}/{cfg['epochs']}  loss {m['loss']:.3f} (cls {m['loss_cls']:.3f} con "
                   f"{m['loss_con']:.3f})  lr {lr:.4g}  top1 {m['top1']:.2f}  many/med/few {fmt(m['many'])}/"
                   f"{fmt(m['medium'])}/{fmt(m['few'])}{found}  {m['seconds']:.0f}s  {m['images_per_s']:.0f} img/s")
        data.write_atomic(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in metrics))
        state = {"model": model.state_dict(), "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                 "epoch": epoch + 1, "config": cfg, "flagged": flagged_all, "rng": {"torch": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
        data.write_atomic(os.path.join(out, "checkpoint.pt"), lambda p: torch.save(state, p))
        data.write_atomic(os.path.join(out, "last_eval.json"), json.dumps({**ev, **counts}))
    if not main_proc:
        return out

    ev = read_json(os.path.join(out, "last_eval.json"))
    best = max(metrics, key=lambda r: r["top1"])
    final = {"final_epoch": {k: ev[k] for k in ("top1", "top5", "many", "medium", "few", "per_class")},
             "epochs": cfg["epochs"], "seed": cfg["seed"], "data_seed": cfg["data_seed"],
             "best_over_epochs_selected_on_test_set": {"top1": best["top1"], "epoch": best["epoch"]},
             "seconds_per_epoch": sum(r["seconds"] for r in metrics) / len(metrics),
             "images_per_s": sum(r["images_per_s"] for r in metrics) / len(metrics),
             "detector_last_epoch": {k: metrics[-1].get(k) for k in ("suspect_frac", "recall", "false_flag_rate",
                                                                     "precision") if k in metrics[-1]}}
    data.write_atomic(os.path.join(out, "final.json"), json.dumps(final, indent=1))
    plot_run(out, metrics, ev)
    if run.use_con and mixed.is_syn.any():
        flagged = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["flagged"].numpy()
        plot_suspects(out, mixed, flagged, cfg["epochs"])
    f = final["final_epoch"]
    print(f"final (epoch {cfg['epochs']}): top1 {f['top1']:.2f}  top5 {f['top5']:.2f}  many/medium/few "
          + "/".join("-" if f[g] is None else f"{f[g]:.2f}" for g in ("many", "medium", "few"))
          + f"  (best over epochs, selected on the test set: {best['top1']:.2f} at epoch {best['epoch']})  -> {out}")
    return out


# ---------------------------------------------------------------- --bench

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(cfg, warmup=3):
    """Time cfg["bench"] steps after warm-up with the run's flags: whole step, data path alone, forward-only (the
    prototype and test passes), peak memory, and the projected time of the full schedule. Writes nothing."""
    run = setup(cfg)
    n, device, mixed = cfg["bench"], run.device, run.mixed
    warmup += 7 * (cfg["compile"] == "on")  # compilation, and a recompilation for the eval graph
    rng = np.random.default_rng(0)
    num_classes = len(mixed.classes)
    protos = F.normalize(torch.randn(num_classes, 2, run.model.proj[-1].out_features, device=device), dim=-1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def timed(batches, work):  # seconds per batch over n batches after warm-up
        it = iter(batches)
        for _ in range(warmup):
            work(next(it))
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            work(next(it))
        sync(device)
        return (time.perf_counter() - t) / n

    epochs = lambda: (ab for e in itertools.count() for ab in streams(run, cfg, e))  # as many steps as asked for
    with warnings.catch_warnings(record=True) as syncs:  # CUDA: every host sync inside a step warns once
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        det = torch.zeros(num_classes, 4, device=device)  # the detector counts are part of the step
        flagged = torch.zeros(len(mixed), dtype=torch.int32, device=device)
        step_s = timed(epochs(), lambda ab: train_step(run, step_inputs(run, cfg, *ab, rng, protos), ab[0][-1], det,
                                                       flagged))
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in syncs) if device.type == "cuda" else None
    data_s = timed(epochs(), lambda ab: step_inputs(run, cfg, *ab, rng, protos))
    real = np.flatnonzero(~mixed.is_syn).tolist() * (1 + (warmup + n) * 256 // max(len(mixed.n_real), 1))

    @torch.no_grad()
    def forward(batch):  # a prototype batch: two views through backbone and projection head, eval mode
        return project_views(run, *batch[:2])
    run.model.eval()
    proto_s = timed(run.batches(("v2", "v3"), 256, 0, real), forward)
    bs = cfg["batch_size"] // run.world
    steps = math.ceil(len(mixed) / cfg["batch_size"])
    # per epoch: the steps, the prototypes (real images, two views, batches of 256), the test set (one view, ~ half)
    epoch_s = steps * step_s + (math.ceil(sum(mixed.n_real) / 256) * run.use_con + len(run.y_test) / 512) * proto_s
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on the GPU"
    else:
        import resource
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (host)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    res = {"device": name, "loader": run.loader, "amp": "bf16" if run.amp else "off", "width": cfg["width"],
           "batch_size": bs, "channels_last": cfg["channels_last"], "compile": cfg["compile"], "steps_timed": n,
           "step_images_per_s": bs / step_s, "data_images_per_s": bs / data_s, "data_fraction": data_s / step_s,
           "forward_images_per_s": 2 * 256 / proto_s, "epoch_s": epoch_s, "run_s": epoch_s * cfg["epochs"],
           "peak": peak, "host_syncs_in_timed_steps": syncs}
    print(f"bench ({name}; loader {run.loader}, amp {res['amp']}, channels_last {cfg['channels_last']}, compile "
          f"{cfg['compile']}, width {cfg['width']}, batch {bs}; {n} steps after {warmup} warm-up):\n"
          f"  whole step      {res['step_images_per_s']:8.1f} images/s  ({1000 * step_s:.1f} ms/step)\n"
          f"  data path alone {res['data_images_per_s']:8.1f} images/s  ({100 * data_s / step_s:.1f}% of a step)\n"
          f"  prototype/test forward passes {res['forward_images_per_s']:.1f} images/s\n"
          f"  peak memory {peak}\n"
          + (f"  host syncs in the timed steps (warm-up included): {syncs}\n" if syncs is not None else "") +
          f"  projected: {epoch_s:.1f} s per epoch, {cfg['epochs']} epochs {epoch_s * cfg['epochs'] / 60:.1f} min "
          f"({steps} steps of {cfg['batch_size']}, prototypes and test set each epoch)")
    print("bench_json " + json.dumps(res))
    return res


def summarize(dirs, out=""):
    """Mean and standard deviation of the final metrics over runs that differ only in --seed."""
    runs = [(d, read_json(os.path.join(d, "config.json")), os.path.join(d, "final.json")) for d in dirs]
    for d, _, f in runs:
        if not os.path.isfile(f):
            raise data.SAUError(f"{d} has no final.json: the run did not finish")
    ref = runs[0][1]
    for d, c, _ in runs[1:]:
        diff = [k for k in CONFIG if k not in RUNTIME | {"seed"} and c.get(k) != ref.get(k)]
        if diff:
            raise data.SAUError(f"{d} differs from {runs[0][0]} in " + ", ".join(f"--{k.replace('_', '-')}" for k in diff)
                                + ": summarize runs that differ only in --seed")
    finals = [read_json(f)["final_epoch"] for _, _, f in runs]
    table = {}
    for k in ("top1", "top5", "many", "medium", "few"):
        v = np.array([f[k] for f in finals if f[k] is not None], float)
        if len(v):
            table[k] = {"mean": v.mean(), "std": v.std(ddof=1) if len(v) > 1 else 0.0, "runs": len(v)}
    name = run_name({**CONFIG_DEFAULTS, **ref}, seed=False)
    lines = [f"{name}: final-epoch test accuracy (%), {ref['epochs']} epochs, seeds "
             f"{', '.join(str(c['seed']) for _, c, _ in runs)}, mean ± std over {len(runs)} runs",
             "| " + " | ".join(table) + " |", "|" + "---|" * len(table),
             "| " + " | ".join(f"{t['mean']:.2f} ± {t['std']:.2f}" for t in table.values()) + " |"]
    print("\n".join(lines))
    path = out or os.path.join("runs", f"summary_{name}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data.write_atomic(path + ".md", "\n".join(lines) + "\n")
    data.write_atomic(path + ".json", json.dumps({"runs": dirs, "config": ref, "final_epoch": table}, indent=1))
    print(f"written: {path}.md, {path}.json")


def plot_run(out, metrics, ev):
    """curves.png, per_class.png and confusion.png in the run folder."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [r["epoch"] for r in metrics]
    detector = metrics[-1]["suspect_frac"] is not None
    fig, ax = plt.subplots(1, 3 + detector, figsize=(5 * (3 + detector), 4))
    for k in ("loss", "loss_cls", "loss_con"):
        ax[0].plot(ep, [r[k] for r in metrics], ".-", label=k)
    ax[1].plot(ep, [r["lr"] for r in metrics], ".-")
    for k in ("top1", "many", "medium", "few"):
        if metrics[-1][k] is not None:
            ax[2].plot(ep, [r[k] for r in metrics], ".-", label=k)
    for k in ("suspect_frac", "recall", "false_flag_rate", "precision") if detector else ():
        if k in metrics[-1]:
            ax[3].plot(ep, [np.nan if r.get(k) is None else r[k] for r in metrics], ".-", label=k)
    for a, t in zip(ax, ("training loss", "learning rate", "test accuracy (%)", "relabel rule on synthetic samples")):
        a.set(title=t, xlabel="epoch")
        a.legend() if a.get_legend_handles_labels()[0] else None
    fig.tight_layout()
    data.write_atomic(os.path.join(out, "curves.png"), lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)

    c = np.arange(len(ev["per_class"]))
    colors = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    fig, ax = plt.subplots(figsize=(max(8, len(c) * 0.12 + 4), 4))
    ax.bar(c, ev["per_class"], color=[colors[data.shot_group(n)] for n in ev["n_real"]])
    ax.set(xlabel="class (label order: head to tail)", ylabel="test accuracy (%)", ylim=(0, 100),
           title="per-class accuracy; bars coloured many / medium / few; lines: train images per class")
    if len(c) <= 20:
        ax.set_xticks(c, ev["classes"], rotation=45, ha="right")
    tw = ax.twinx()
    tw.plot(c, ev["n_real"], "k.-", label="real")
    tw.plot(c, ev["n_syn"], "g.--", label="synthetic")
    tw.set(ylabel="train images", yscale="symlog")
    tw.legend(loc="upper right")
    fig.tight_layout()
    data.write_atomic(os.path.join(out, "per_class.png"), lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)

    cm = np.asarray(ev["confusion"], float)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(cm / cm.sum(1, keepdims=True).clip(min=1), cmap="Blues", vmin=0, vmax=1)
    ax.set(xlabel="predicted", ylabel="true", title="confusion (rows normalised)")
    if len(c) <= 20:
        ax.set_xticks(c, ev["classes"], rotation=45, ha="right")
        ax.set_yticks(c, ev["classes"])
    fig.colorbar(im)
    fig.tight_layout()
    data.write_atomic(os.path.join(out, "confusion.png"), lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def plot_suspects(out, mixed, flagged, epochs, per_side=8):
    """suspects.png: per class (every tenth beyond 20 classes), the synthetic images taken as suspects in the most
    epochs and those in the fewest, each with its count; planted wrong-class images outlined in red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    num_classes = len(mixed.classes)
    shown = [c for c in range(num_classes) if num_classes <= 20 or c % 10 == 0]
    m, text = 3, 11  # margin for the outline, band below each image for its count
    s = 32 + 2 * m
    cols = 2 * per_side + 1  # a blank column between the two sides
    mosaic = np.full((len(shown) * (s + text), cols * s, 3), 255, np.uint8)
    fig, ax = plt.subplots(figsize=(cols * s / 50, len(shown) * (s + text) / 50 + 0.9))
    order = np.random.default_rng(0).permutation(len(mixed))  # ties broken at random, the same in every run
    for r, c in enumerate(shown):
        syn = order[mixed.is_syn[order] & (mixed.labels[order] == c)]
        y0 = r * (s + text)
        if not len(syn):
            ax.text(cols * s / 2, y0 + s / 2, "no synthetic images", ha="center", va="center", fontsize=8)
        most = syn[np.argsort(-flagged[syn], kind="stable")[:per_side]]
        fewest = syn[np.argsort(flagged[syn], kind="stable")[:per_side]]
        for col, i in [(k, i) for k, i in enumerate(most)] + [(per_side + 1 + k, i) for k, i in enumerate(fewest)]:
            x0 = col * s
            mosaic[y0 + m:y0 + m + 32, x0 + m:x0 + m + 32] = mixed.images[i]
            if mixed.is_noisy[i]:
                ax.add_patch(matplotlib.patches.Rectangle((x0 + 0.5, y0 + 0.5), s - 2, s - 2, fill=False,
                                                          edgecolor="red", linewidth=1.5))
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
    fig.tight_layout()
    data.write_atomic(os.path.join(out, "suspects.png"), lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def main():
    cfg = get_config()
    runs = cfg.pop("summarize", None)
    if runs:
        return summarize(runs, cfg["out"])
    bench(cfg) if cfg["bench"] else train(cfg)


if __name__ == "__main__":
    data.run_cli(main)
