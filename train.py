"""SAU training: one ResNet-32, a synthetic-unaware classifier and a synthetic-aware contrastive branch.

    python train.py --dataset cifar10 --imb 100                 # the paper's settings, writes runs/<name>/
    python train.py --dataset cifar10 --imb 100 --syn none      # the long-tailed baseline
    python train.py --resume runs/<name>                        # continue a killed run

Read top to bottom: the settings, the losses, the step, the loop, prototypes and evaluation, the epoch audit, then
the machinery (set-up, checkpoints, --bench, the command line). docs/method.md describes the method.
"""
import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
import warnings
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import report
import views
from model import resnet32

S, POSITIVE, NON_NEGATIVE, AT_LEAST_1 = data.Setting, data.POSITIVE, data.NON_NEGATIVE, data.AT_LEAST_1
ON_OFF, AUDIT_SCORES = ("on", "off"), report.AUDIT_SCORES
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
    "summarize": S(None, "mean and std of finished runs' final metrics over seeds (writes --out or "
                   "runs/summary_<name>.md/.json) and exit", scope="call", type=str, nargs="+"),
    "stop_after": S(0, "leave after this many epochs in total, checkpoint kept (for time-limited jobs; ours)",
                    NON_NEGATIVE, scope="call"),
}
# A setting that cannot act under another one is refused rather than silently named: (setting, when, because).
IGNORED = [("strategy", lambda c: c["relabel"] == "off", "with --relabel off"),
           *[(k, lambda c: c["relabel"] != "audit", "with --relabel other than audit")
             for k in ("audit_score", "audit_q", "audit_cls")],
           *[(k, lambda c: c["w_con"] == 0, "with --w-con 0") for k in ("relabel", "strategy", "temperature")],
           *[(k, lambda c: c["w_cls"] == 0, "with --w-cls 0") for k in ("mix_alpha", "audit_cls")],
           *[(k, lambda c: c["syn"] == "none", "with --syn none") for k in ("syn_ratio", "syn_noise", "pool")],
           ("pool", lambda c: c["syn"] == "heldout", "with --syn heldout"),
           ("workers", lambda c: c["loader"] == "gpu", "with --loader gpu"),
           ("sync_bn", lambda c: int(os.environ.get("WORLD_SIZE", 1)) == 1,
            "with one process (it acts under torchrun)")]


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
    """The synthetic-aware branch (docs/method.md). z [B, 2, D] unit, labels [B], is_syn [B], prototypes [C, 2, D]
    -> scalar loss (and the suspects, [B] bool). given [B] bool: the suspects (the audit's) in place of the paper's
    rule. Who takes part is a mask, not a subset, so the step never waits for the host."""
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


# ---------------------------------------------------------------- the step


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


# ---------------------------------------------------------------- the loop


def train(cfg):
    """The run in its folder. checkpoint.pt is the folder's state: it holds all that the next epoch and the reports
    need (weights, optimiser, schedule, epoch, config, metrics, last evaluation, suspect counts) and is replaced in one
    rename per epoch; config.json, metrics.jsonl, final.json and the pictures are derived from it, and rebuilt by
    --resume, so a kill at any instant leaves a folder that --resume finishes."""
    out = cfg["out"] or os.path.join("runs", run_name(cfg))
    main_proc = int(os.environ.get("RANK", 0)) == 0
    lock = data.own(out) if main_proc else None
    how = f"the last finished epoch is kept: continue with python train.py --resume {out}"
    try:
        return run_epochs(cfg, out, main_proc)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(how) from None
    except Exception:
        if not data.interrupted():
            raise
        raise KeyboardInterrupt(how) from None
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
        epoch_seed = cfg["seed"] * views.SEED_MIX + epoch
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
            data.check_interrupt()  # a Ctrl-C that came during a DataLoader worker's fork
            parts = train_step(run, step_inputs(run, cfg, a, b, rng, protos, epoch, given), flagged)
            sums += parts
            bad_step.masked_fill_((bad_step < 0) & ~torch.isfinite(parts[0]), step + 1)
            n_seen += len(a[-1]) * world
            bar.update(len(a[-1]) * world)
            if step % 20 == 0:  # .item() syncs the device: only now and then
                check_finite(bad_step, epoch, out, world)
                bar.set_postfix(loss=f"{parts[0].item():.3f}")
        check_finite(bad_step, epoch, out, world, model)
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
            fig = report.audit_figures(scores, ranks, mixed, cfg["audit_q"], epoch_flags)
            audited = {**{f"auc_{k}": fig[k]["auc"] for k in (*AUDIT_SCORES, "flags")}, "audit": fig,
                       "audit_s": time.time() - t1}
        metrics.append({"epoch": epoch + 1, "lr": lr, "loss": loss_sum / world / steps,
                        "loss_cls": cls_sum / world / steps, "loss_con": con_sum / world / steps,
                        "suspect_frac": None, **(report.detector(epoch_flags, mixed) if run.use_con else {}),
                        **{k: ev[k] for k in ("top1", "top5", "many", "medium", "few")},
                        "seconds": time.time() - t0, "images_per_s": n_seen / train_s, **audited})
        if not main_proc:
            continue
        report.print_epoch(metrics[-1], cfg["epochs"])
        state = {"model": model.state_dict(), "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                 "epoch": epoch + 1, "config": cfg, "flagged": flagged_all, "metrics": metrics, "eval": ev,
                 "audit": scores, "suspects": suspects}
        data.write_atomic(os.path.join(out, "checkpoint.pt"), lambda p: torch.save(state, p))  # the one step
        data.write_atomic(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in metrics))
    if main_proc:
        report.write_final(out, cfg, metrics, ev, mixed, flagged_all.numpy(), scores)
    return out


# ---------------------------------------------------------------- prototypes and evaluation


def project_views(run, *views):
    """[B, V, D]: each view through the backbone and the projection head, under the run's autocast."""
    with torch.autocast(run.device.type, torch.bfloat16, enabled=run.amp):
        return torch.stack([run.model.project(run.model.features(run.prep(v))) for v in views], 1)


@torch.no_grad()
def prototypes(run, seed):
    """[C, 2, D]: per class, the mean projection of its real images through v2 and v3 (eval mode)."""
    model, device = run.model, run.device
    eval_mode(model, run.world)
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
def confusion_counts(run):
    """(confusion [C * C], top-5 hits []) of the classifier head on the test set, on the device, summed over
    processes."""
    model, device, num_classes = run.model, run.device, len(run.mixed.classes)
    eval_mode(model, run.world)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    top5_hits = torch.zeros((), dtype=torch.long, device=device)
    for i, x in plain_batches(run, run.x_test):
        y = run.y_test[i:i + len(x)].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=run.amp):
            top5 = model.fc(model.features(x)).float().topk(min(5, num_classes), 1).indices
        confusion.index_add_(0, y * num_classes + top5[:, 0], torch.ones_like(y))
        top5_hits += (top5 == y[:, None]).any(1).sum()
    return all_sum(confusion, run.world), all_sum(top5_hits, run.world)


def evaluate(run):
    """Top-1, top-5, per-class accuracy, many/medium/few and the confusion matrix on the test set."""
    n_real, (confusion, top5_hits) = run.mixed.n_real, confusion_counts(run)
    confusion, top5_hits = confusion.reshape(len(n_real), len(n_real)).cpu(), top5_hits.item()
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    groups = {g: [a for a, n in zip(per_class, n_real) if data.shot_group(n) == g] for g in ("many", "medium", "few")}
    return {"top1": 100 * confusion.diag().sum().item() / len(run.y_test), "top5": 100 * top5_hits / len(run.y_test),
            **{g: 100 * sum(v) / len(v) if v else None for g, v in groups.items()},
            "per_class": [100 * a for a in per_class], "confusion": confusion.tolist()}


# ---------------------------------------------------------------- the epoch audit (ours)


@torch.no_grad()
def audit(run, protos):
    """[N, 2] scores of every sample of the mixed set on its plain image, in eval mode (audit_scores)."""
    eval_mode(run.model, run.world)
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


# ---------------------------------------------------------------- the run's machinery: set-up, processes, checkpoints


@dataclasses.dataclass
class Run:
    """What a run holds from set-up to its end (setup)."""
    world: int  # processes (torchrun's WORLD_SIZE; 1 without it)
    rank: int  # this process's (RANK)
    device: torch.device  # as --device chose it: "cuda", "cuda:N" (LOCAL_RANK under torchrun) or "cpu"
    amp: bool  # bf16 autocast on
    loader: str  # "cpu" (DataLoader workers, torchvision) or "gpu" (the set on the device, batched views)
    prep: Callable  # a batch to the device, in the network's memory format
    mixed: data.MixedSet  # the training set: real + synthetic, with is_syn and is_noisy
    real_share: object  # this process's real images, the prototypes' set (a device tensor, or a list for cpu)
    batches: Callable  # data.batch_maker's: (views, batch size, seed, order) -> batches
    x_test: torch.Tensor  # uint8 [10000, 3, 32, 32] on the host; y_test: [10000]
    y_test: torch.Tensor
    x_train: torch.Tensor  # uint8 [N, 3, 32, 32] for the audit: the gpu loader's device copy, else a host view
    y_train: torch.Tensor  # [N] on the device
    mean: torch.Tensor  # [3, 1, 1] normalisation (views.MEAN_STD), on the device
    std: torch.Tensor
    model: torch.nn.Module  # the ResNet-32 (its backbone compiled with --compile on)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    use_cls: bool  # --w-cls > 0: the classification branch runs
    use_con: bool  # --w-con > 0: the contrastive branch and its prototypes run
    step_fn: torch.nn.Module  # Step, wrapped in DistributedDataParallel under torchrun


def setup(cfg):
    """Everything a run holds before its first step: processes, device, data, model, optimiser, the step."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))  # set by torchrun
    if world > 1 and cfg["batch_size"] % world:
        raise data.SAUError(f"--batch-size {cfg['batch_size']} does not split over {world} processes")
    device = data.use_device(cfg["device"], cfg["deterministic"] == "on")
    if cfg["sync_bn"] == "on" and device.type != "cuda":
        raise data.SAUError("--sync-bn on needs CUDA (torch's SyncBatchNorm runs on GPUs only): drop it on a CPU")
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    amp = cfg["amp"] == "bf16" or (cfg["amp"] == "auto" and (device.type == "cuda" or data.cpu_has_bf16()))
    loader = cfg["loader"] if cfg["loader"] != "auto" else "gpu" if device.type == "cuda" else "cpu"
    workers = cfg["workers"] if cfg["workers"] >= 0 else 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)
    fmt = torch.channels_last if cfg["channels_last"] == "on" else torch.contiguous_format

    mixed = data.build_mixed(**{k: cfg[k] for k in data.DATA_CONFIG})
    real = torch.from_numpy(np.flatnonzero(~mixed.is_syn))[rank::world]  # this process's real images
    batches = data.batch_maker(mixed, loader, device, workers)
    x_test, y_test = data.load_cifar(cfg["dataset"], cfg["data_root"], train=False)
    host_view = torch.from_numpy(mixed.images).permute(0, 3, 1, 2)  # no copy
    mean, std = (torch.tensor(s, device=device)[:, None, None] for s in views.MEAN_STD[cfg["dataset"]])

    torch.manual_seed(cfg["seed"])
    model = resnet32(len(mixed.classes), cfg["width"]).to(device, memory_format=fmt)
    if cfg["compile"] == "on":  # the backbone only: the heads are small and the loss has masks, not shapes
        model.features = torch.compile(model.features)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    step_fn = Step(model, cfg, *(torch.tensor(n, device=device) for n in (mixed.n_real, mixed.n_syn)))
    if world > 1:
        if cfg["sync_bn"] == "on":
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        step_fn = torch.nn.parallel.DistributedDataParallel(
            step_fn, find_unused_parameters=not (cfg["w_cls"] > 0 and cfg["w_con"] > 0))
    return Run(world=world, rank=rank, device=device, amp=amp, loader=loader,
               prep=lambda x: x.to(device, non_blocking=True).contiguous(memory_format=fmt), mixed=mixed,
               real_share=real.to(device) if loader == "gpu" else real.tolist(),  # copied once, not every epoch
               batches=batches, x_test=torch.from_numpy(x_test).permute(0, 3, 1, 2), y_test=torch.from_numpy(y_test),
               x_train=getattr(batches, "images", host_view), y_train=torch.from_numpy(mixed.labels).to(device),
               mean=mean, std=std, model=model, opt=opt,
               sched=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"]),
               use_cls=cfg["w_cls"] > 0, use_con=cfg["w_con"] > 0, step_fn=step_fn)


def streams(run, cfg, epoch_seed):
    views_a = (("v1",) if run.use_cls else ()) + (("v2", "v3") if run.use_con else ())
    return data.train_streams(run.mixed, cfg["batch_size"], epoch_seed, views_a, run.use_cls, run.rank, run.world,
                              run.batches)


def all_sum(t, world, op="SUM"):
    if world > 1:
        torch.distributed.all_reduce(t, getattr(torch.distributed.ReduceOp, op))
    return t


def eval_mode(model, world):
    """model.eval() with rank 0's BatchNorm statistics on every process (DDP sends them only at a training forward,
    and each process's last one moves its own): the model each process evaluates is the one the checkpoint saves."""
    model.eval()
    for b in model.buffers() if world > 1 else ():
        torch.distributed.broadcast(b, 0)


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
    diff = data.config_diff(CONFIG, ckpt["config"], cfg) if cfg else []
    if diff:
        raise data.SAUError(f"checkpoint {path} was made with another config: " + ", ".join(
            f"--{k.replace('_', '-')} {ckpt['config'].get(k, CONFIG[k].default)} (now {cfg[k]})" for k in diff)
            + "; resume with the same flags or start a new --out")
    return ckpt


def check_finite(bad_step, epoch, out, world=1, model=None):
    """Stop at a non-finite loss (bad_step: its first step, or -1) or, given the model, at non-finite weights: what
    is saved is always finite. Decided over all processes, so that they stop together."""
    bad_weights = torch.zeros((), device=bad_step.device)
    if model is not None:
        bad_weights = (~torch.stack([t.isfinite().all() for t in model.state_dict().values()
                                     if t.is_floating_point()]).all()).float()
    worst = all_sum(torch.stack([bad_step.float(), bad_weights]), world, "MAX").tolist()
    if worst[0] < 0 and not worst[1]:
        return
    what = f"loss at epoch {epoch + 1}, step {int(worst[0])}" if worst[0] >= 0 else f"weights after epoch {epoch + 1}"
    kept = f"epoch {epoch}" if epoch else "none yet"
    raise data.SAUError(f"non-finite {what}: stopped; the last good checkpoint ({kept}) is kept in {out}; try a lower "
                        f"--lr")


# ---------------------------------------------------------------- --bench


def bench(cfg, warmup=3):
    """Time cfg["bench"] steps after warm-up with the run's flags: whole step, data path alone, forward-only (the
    prototype and test passes), peak memory, host syncs (CUDA), the projected full schedule. Writes nothing."""
    run = setup(cfg)
    n, device, mixed, cuda = cfg["bench"], run.device, run.mixed, run.device.type == "cuda"
    warmup += 7 * (cfg["compile"] == "on")  # compilation, and a recompilation for the eval graph
    rng = np.random.default_rng(0)
    protos = F.normalize(torch.randn(len(mixed.classes), 2, run.model.proj[-1].out_features, device=device), dim=-1)
    flagged = torch.zeros(len(mixed), dtype=torch.int32, device=device)

    def timed(batches, work, begin=lambda: None):  # seconds per batch over n batches after warm-up
        it = iter(batches)
        for i in range(warmup + n):
            if i == warmup:
                data.synchronize(device)
                begin()
                t = time.perf_counter()
            work(next(it))
        data.synchronize(device)
        return (time.perf_counter() - t) / n

    epochs = lambda: (ab for e in itertools.count() for ab in streams(run, cfg, e))  # as many steps as asked for
    with warnings.catch_warnings(record=True) as syncs:  # CUDA: every host sync inside a timed step warns once
        warnings.simplefilter("always")  # (the warm-up's one-time copies and compilation are not counted)
        try:
            step_s = timed(epochs(), lambda ab: train_step(run, step_inputs(run, cfg, *ab, rng, protos), flagged),
                           begin=lambda: data.sync_debug(device, "warn"))
        finally:
            data.sync_debug(device, "default")
    syncs = sum("synchroniz" in str(w.message) for w in syncs) if cuda else None
    data_s = timed(epochs(), lambda ab: step_inputs(run, cfg, *ab, rng, protos))
    real = np.flatnonzero(~mixed.is_syn).tolist() * (1 + (warmup + n) * 256 // max(len(mixed.n_real), 1))
    run.model.eval()
    with torch.no_grad():  # a prototype batch: two views through backbone and projection head
        proto_s = timed(run.batches(("v2", "v3"), 256, 0, real), lambda batch: project_views(run, *batch[:2]))
    bs, steps = cfg["batch_size"] // run.world, math.ceil(len(mixed) / cfg["batch_size"])
    # per epoch: the steps, the prototypes (real images, two views, batches of 256), the test set (one view, ~ half)
    epoch_s = steps * step_s + (math.ceil(sum(mixed.n_real) / 256) * run.use_con + len(run.y_test) / 512) * proto_s
    name, peak = data.device_figures(device)
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


# ---------------------------------------------------------------- the command line


def get_config(argv=None):
    """The command's settings: parsed and checked (data.parse_settings); with --resume, those not given are the
    run's own, its runtime choices too."""
    def resumed(cfg, given):
        if not cfg["resume"]:
            return cfg
        saved = os.path.join(cfg["resume"], "config.json")
        if os.path.isfile(saved):
            saved = data.read_json(saved)
        elif os.path.isfile(os.path.join(cfg["resume"], "checkpoint.pt")):  # config.json is derived: rebuilt from it
            saved = load_checkpoint(cfg["resume"])["config"]
        else:
            raise data.SAUError(f"--resume {cfg['resume']}: no config.json there, so no run to continue")
        kept = {k: v for k, v in saved.items() if k in CONFIG and CONFIG[k].scope != "call"}
        return {**cfg, **kept, **given, "out": cfg["resume"]}
    cfg = data.parse_settings(CONFIG, IGNORED, __doc__, argv, resumed,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    if cfg["w_cls"] == cfg["w_con"] == 0:
        raise data.SAUError("--w-cls and --w-con are both 0: nothing to train")
    return cfg


def run_name(cfg, seed=True):
    return data.run_name(CONFIG, cfg, seed)


def main():
    cfg = get_config()
    if cfg["summarize"]:
        return report.summarize(CONFIG, cfg["summarize"], cfg["out"])
    bench(cfg) if cfg["bench"] else train(cfg)


if __name__ == "__main__":
    data.run_cli(main)
