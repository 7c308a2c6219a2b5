"""SAU training: one ResNet-32 with a synthetic-unaware classifier and a synthetic-aware contrastive
branch, trained on a long-tailed set whose tail is filled with synthetic images.

    python train.py --dataset cifar10 --imb 100              # the paper's settings: runs/<name>/
    python train.py --dataset cifar10 --imb 100 --syn none   # the long-tailed baseline
    python train.py --resume runs/<name>                     # continue a killed run

Top to bottom: the settings, the losses, the step, one epoch and the run, prototypes and evaluation,
the set-up and the command line (docs/method.md; audit.py: the epoch audit; runner.py: the rest).
"""
import argparse
import itertools
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import audit
import bench
import cli
import data
import report
import runner
import views

S, POSITIVE, NON_NEGATIVE = cli.Setting, cli.POSITIVE, cli.NON_NEGATIVE
AT_LEAST_1, ON_OFF = cli.AT_LEAST_1, ("on", "off")
# Every setting that shapes the results, one entry each: default (the paper's value unless marked
# ours), help, check, choices, run-name tag (cli.Setting). The parser, the checks, the run name,
# --resume and --summarize follow from this table; runner.RUNTIME_CONFIG adds the device, speed
# and one-command settings.
CONFIG = {
    **data.DATA_CONFIG,  # dataset, imb, syn, syn_ratio, syn_noise, pool, data_root, data_seed
    "w_cls": S(1.0, "weight of the classification branch (mixup + cutmix); 0 skips it",
               NON_NEGATIVE, tag="wcls"),
    "w_con": S(1.0, "weight of the contrastive branch; 0 skips it and its prototypes",
               NON_NEGATIVE, tag="wcon"),
    "relabel": S("on", "who is a suspect, relabelled by --strategy: on: the paper's rule | audit: "
                 "the epoch audit's flags (ours) | off: nobody", choices=("on", "audit", "off")),
    "audit_score": S("p", "--relabel audit's score: p: the classifier's log p(label) | margin: the "
                     "prototype margin | both: their ranks summed (ours)", choices=audit.SCORES,
                     tag="as"),
    "audit_q": S(0.1, "--relabel audit flags a synthetic sample scoring below this quantile of its "
                 "class's real images: the false-flag rate accepted (ours)",
                 (lambda v: 0 < v < 1, "in (0, 1)"), tag="q"),
    "audit_cls": S("off", "on: a mixup or cutmix pair holding a suspect of --relabel audit leaves "
                   "the classification branch too (ours)", choices=ON_OFF, tag="acls"),
    "strategy": S("pos_neg", "what suspects become", choices=("pos_neg", "neg_only", "drop"),
                  tag=""),
    "temperature": S(0.1, "contrastive temperature", POSITIVE, tag="t"),
    "mix_alpha": S(1.0, "mixup and cutmix lam ~ Beta(alpha, alpha)", POSITIVE, tag="alpha"),
    "epochs": S(200, "epochs, each one pass of stream A", AT_LEAST_1, tag="e"),
    "batch_size": S(128, "images per step in each stream", (lambda v: v >= 2, ">= 2"), tag="b"),
    "lr": S(0.01, "SGD learning rate, cosine-annealed per epoch to 0", POSITIVE),
    "momentum": S(0.9, "SGD momentum", (lambda v: 0 <= v < 1, "in [0, 1)"), tag="m"),
    "weight_decay": S(5e-3, "SGD weight decay", NON_NEGATIVE, tag="wd"),
    "width": S(64, "ResNet-32 stem width (stages w, 2w, 4w)",
               (lambda v: v >= 2 and v % 2 == 0, "even and >= 2"), tag="w"),
    "seed": S(0, "training seed: init, order, augmentation, mixing", cli.SEED, named="never"),
    **runner.RUNTIME_CONFIG,
}
# (setting, when, because): a setting that cannot act under another is refused, never named
IGNORED = [
    ("strategy", lambda c: c["relabel"] == "off", "with --relabel off"),
    *[(k, lambda c: c["relabel"] != "audit", "with --relabel other than audit")
      for k in ("audit_score", "audit_q", "audit_cls")],
    *[(k, lambda c: c["w_con"] == 0, "with --w-con 0")
      for k in ("relabel", "strategy", "temperature")],
    *[(k, lambda c: c["w_cls"] == 0, "with --w-cls 0") for k in ("mix_alpha", "audit_cls")],
    *data.DATA_IGNORED,
]


# ---------------------------------------------------------------- losses


def soft_ce(logits, targets, weight=None):
    """Soft-target cross-entropy, mean_i(-sum_k t_ik log_softmax(o)_ik); weight [B]: weighted."""
    ce = -(targets * F.log_softmax(logits.float(), dim=1)).sum(1)
    return ce.mean() if weight is None else (ce * weight).sum() / weight.sum().clamp(min=1)


def supcon(feats, labels, is_anchor, temperature, member=None):
    """Supervised contrastive loss. feats [M, V, D], labels [M], is_anchor [M] bool -> scalar;
    non-members (member [M] bool, default all) take no part, as if left out, with fixed shapes."""
    m, v = feats.shape[:2]
    member = torch.ones_like(is_anchor) if member is None else member
    # fp32 products, also inside the step's bf16 autocast
    with torch.autocast(feats.device.type, enabled=False):
        f = feats.transpose(0, 1).reshape(m * v, -1).float()  # MV x D, view-major
        y, keep = labels.repeat(v), member.repeat(v)  # MV
        self_pair = torch.eye(m * v, dtype=torch.bool, device=f.device)
        logits = (f @ f.T / temperature).masked_fill(~keep[None, :], -torch.inf)  # MV x MV
        # log-softmax over all other members; logsumexp subtracts the row max for stability
        others = logits.masked_fill(self_pair, -torch.inf)
        log_prob = logits - torch.logsumexp(others, dim=1, keepdim=True)
        pos = (y[:, None] == y[None, :]) & ~self_pair & keep[None, :]  # MV x MV
        # an anchor without a positive adds 0
        per_anchor = -log_prob.masked_fill(~pos, 0).sum(1) / pos.sum(1).clamp(min=1)  # MV
        anchors = (is_anchor & member).repeat(v)
        return (per_anchor * anchors).sum() / anchors.sum().clamp(min=1)


def with_prototypes(z, labels, is_syn, prototypes):
    """The batch with the class prototypes joined as C extra real samples (labels 0..C-1)."""
    c = len(prototypes)
    feats = torch.cat([z, prototypes.to(z.dtype)])
    labels = torch.cat([labels, torch.arange(c, device=z.device)])
    is_syn = torch.cat([is_syn.bool(), torch.zeros(c, dtype=torch.bool, device=z.device)])
    return feats, labels, is_syn


@torch.no_grad()
def paper_suspects(z, labels, is_syn, prototypes):
    """[B] bool, the paper's relabel rule: a synthetic sample whose most cosine-similar real sample
    or prototype, in either view, has another label. z [B, 2, D] unit, prototypes [C, 2, D]."""
    feats, y, syn = with_prototypes(z, labels, is_syn, prototypes)
    f = F.normalize(feats.float(), dim=-1)
    with torch.autocast(f.device.type, enabled=False):  # fp32, also inside the step's autocast
        # V x M x M; a synthetic sample is never anyone's neighbour, itself included
        sim = torch.einsum("mvd,avd->vma", f, f).masked_fill(syn, -torch.inf)
    found = (y[sim.argmax(-1)] != y).any(0)  # V x M -> M
    return (found & syn)[:len(labels)]


def sau_contrastive_loss(z, labels, is_syn, prototypes, suspect=None, strategy="pos_neg",
                         temperature=0.1):
    """The synthetic-aware branch: contrast over the batch and the prototypes, suspects [B] bool
    treated by the strategy."""
    if strategy not in CONFIG["strategy"].choices:
        raise ValueError(f"unknown strategy {strategy!r}: one of {CONFIG['strategy'].choices}")
    # The prototypes join the batch as extra real samples: every sample has positives of its
    # class, however few real images of it the batch holds.
    feats, y, syn = with_prototypes(z, labels, is_syn, prototypes)
    if suspect is None:
        suspect = torch.zeros_like(is_syn, dtype=torch.bool)
    suspect = torch.cat([suspect.bool(), torch.zeros_like(syn[len(labels):])]) & syn
    # Who takes part is a mask, not a subset: the shapes stay fixed and the step never waits for
    # the host to count the suspects.
    member, anchor = torch.ones_like(syn), torch.ones_like(syn)
    if strategy == "pos_neg":
        # A suspect's label is not trusted, its image is: a fresh label of its own makes its
        # other view its only positive and every other sample a negative.
        y = torch.where(suspect, -1 - torch.arange(len(y), device=z.device), y)
    elif strategy == "neg_only":  # contrast samples only, never anchors
        y = torch.where(suspect, -1, y)
        anchor = ~suspect
    else:  # drop
        member = ~suspect
    return supcon(feats, y, anchor, temperature, member)


def mix(xa, xb, ta, tb, draws):
    """Mixup and cutmix of xa with xb (B x 3 x H x W; targets ta, tb [B, C]) from their random
    numbers, draws [4] float64: mixup's lam, cutmix's lam and its box's centre (y, x). The box, of
    side W * sqrt(1 - lam), is the reference's: a continuous centre, the clipped edges rounded to
    pixels; a mask, so that the shapes never change."""
    lam, cut, cy, cx = draws.unbind()
    x_mix, t_mix = lam * xa + (1 - lam) * xb, lam * ta + (1 - lam) * tb
    (h, w), side = xa.shape[-2:], (1 - cut).sqrt()
    bh, bw = h * side, w * side
    y0, y1 = (cy - bh / 2).clamp(min=0).round(), (cy + bh / 2).clamp(max=h).round()
    x0, x1 = (cx - bw / 2).clamp(min=0).round(), (cx + bw / 2).clamp(max=w).round()
    rows, cols = (torch.arange(n, device=xa.device) for n in (h, w))
    box = ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))  # H x W
    # the weight is the true pasted area, also when the box is clipped
    wa = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x_mix, t_mix, torch.where(box, xb, xa), wa * ta + (1 - wa) * tb


def mix_draws(rng, steps, alpha, h=32, w=32):
    """[steps, 4] float64: per step, mixup's lam, cutmix's lam and box centre (y, x), in order."""
    return torch.tensor([[rng.beta(alpha, alpha), rng.beta(alpha, alpha), rng.uniform(0, h),
                          rng.uniform(0, w)] for _ in range(steps)], dtype=torch.float64)


# ---------------------------------------------------------------- the step


class StepInputs(NamedTuple):
    """One step's inputs on the device. A stream's batch (views.Batch) holds its uint8 images and
    its views' random numbers, made into views inside the step."""
    a: views.Batch  # stream A: v1 (classification), v2 and v3 (contrastive), y, is_syn, index
    b: views.Batch  # stream B: the mixing partners' v1; None without the classification branch
    mix: torch.Tensor  # [4] float64: this step's mix_draws
    protos: torch.Tensor  # C x 2 x D: this epoch's real-data prototypes
    epoch: int  # 0-based
    suspect: torch.Tensor = None  # B bool: the epoch audit's suspects (--relabel audit), else None
    keep: torch.Tensor = None  # B: 0 for a mixed pair with a suspect (--audit-cls on), else None


class Step(torch.nn.Module):
    """The views and forward passes of one step and their losses, one module call so that
    torch.compile makes one graph. It sees the run's settings, the real and synthetic counts per
    class (n_real, n_syn: C on the device) and, per call, StepInputs."""

    def __init__(self, model, cfg, n_real, n_syn, views, fmt=torch.contiguous_format):
        super().__init__()
        self.model, self.cfg, self.n_real, self.n_syn = model, cfg, n_real, n_syn
        self.views, self.fmt = views, fmt  # views.DeviceViews; the network's memory format

    def views_of(self, batch):  # name -> B x 3 x 32 x 32 in the network's memory format
        made = self.views.apply(batch.images, batch.draws)
        return {v: x.contiguous(memory_format=self.fmt) for v, x in made.items()}

    def forward(self, s: StepInputs):
        m, cfg, a = self.model, self.cfg, self.views_of(s.a)
        zero = torch.zeros((), device=s.a.y.device)
        loss_cls, loss_con, suspect = zero, zero, torch.zeros_like(s.a.is_syn)
        # The whole model, as the reference: the projection head's BatchNorm sees these too.
        # Stream B is an independent shuffle of the same mixed set: each sample of A is mixed with
        # a random partner, real or synthetic alike (the classifier is synthetic-unaware).
        if s.b is not None:
            # one-hot without F.one_hot's range check, a device sync
            classes = torch.arange(len(self.n_real), device=s.a.y.device)
            ta, tb = ((y[:, None] == classes).float() for y in (s.a.y, s.b.y))
            x_mix, t_mix, x_cut, t_cut = mix(a["v1"], self.views_of(s.b)["v1"], ta, tb, s.mix)
            loss_cls = soft_ce(m(x_mix)[0], t_mix, s.keep) + soft_ce(m(x_cut)[0], t_cut, s.keep)
        if "v2" in a:
            z = torch.stack([m.project(m.features(a["v2"])), m.project(m.features(a["v3"]))], 1)
            if s.suspect is not None:
                suspect = s.suspect & s.a.is_syn
            elif cfg["relabel"] == "on":
                suspect = paper_suspects(z, s.a.y, s.a.is_syn, s.protos)
            loss_con = sau_contrastive_loss(z, s.a.y, s.a.is_syn, s.protos, suspect,
                                            cfg["strategy"], cfg["temperature"])
        return cfg["w_cls"] * loss_cls + cfg["w_con"] * loss_con, loss_cls, loss_con, suspect


def step_inputs(cfg, a, b, mix, protos, epoch=0, audit_suspects=None):
    """StepInputs of a pair of batches; audit_suspects [N] bool: the epoch audit's suspects over
    the mixed set (--relabel audit), else None."""
    keep = suspect = None
    if audit_suspects is not None:
        suspect = audit_suspects[a.index] if cfg["w_con"] > 0 else None
        if b is not None and cfg["audit_cls"] == "on":
            keep = (~(audit_suspects[a.index] | audit_suspects[b.index])).float()
    return StepInputs(a, b, mix, protos, epoch, suspect, keep)


def train_step(run, inputs, counts):
    """Forward, backward, SGD step (the model in train mode); adds the step's suspects to counts
    [N] (epochs each sample was a suspect); returns [loss, cls, con] on the device, no sync."""
    with torch.autocast(run.device.type, torch.bfloat16, enabled=run.amp):
        loss, loss_cls, loss_con, suspect = run.step_fn(inputs)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    counts.index_add_(0, inputs.a.index, (suspect & inputs.a.is_syn).int())
    return torch.stack([loss.detach(), loss_cls.detach(), loss_con.detach()]).float()


# ---------------------------------------------------------------- one epoch, and the run


def train_epoch(run, cfg, epoch, protos, suspects, folder):
    """One pass of stream A: ([loss, cls, con] means over steps, images seen)."""
    # every random draw of an epoch follows from (seed, epoch): a resumed run repeats it exactly
    rng = np.random.default_rng(data.stream_seed(cfg["seed"], epoch, "mix"))  # mixup and cutmix
    # drawn for the epoch at once (at least its steps): one copy to the device, none a step
    steps = -(-len(run.mixed) // cfg["batch_size"])
    mixes = mix_draws(rng, steps, cfg["mix_alpha"]).to(run.device)
    audit_suspects = suspects.next.to(run.device) if cfg["relabel"] == "audit" else None
    run.model.train()
    sums, seen = torch.zeros(3, device=run.device), 0  # loss, cls, con; images
    # the first step with a non-finite loss, found without a sync
    bad_step = torch.full((), -1, device=run.device)
    bar = tqdm(total=len(run.mixed), unit="img", desc=f"epoch {epoch + 1}/{cfg['epochs']}",
               leave=False, dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)
    for step, (batch_a, batch_b) in enumerate(streams(run, cfg, epoch)):
        inputs = step_inputs(cfg, batch_a, batch_b, mixes[step], protos, epoch, audit_suspects)
        losses = train_step(run, inputs, suspects.counts)
        sums += losses
        bad_step.masked_fill_((bad_step < 0) & ~torch.isfinite(losses[0]), step + 1)
        seen += len(batch_a.index)
        bar.update(len(batch_a.index))
        if step % 20 == 0:  # .item() syncs the device: only now and then
            folder.check_finite(run, bad_step, epoch)
            bar.set_postfix(loss=f"{losses[0].item():.3f}")
    folder.check_finite(run, bad_step, epoch, weights=True)
    bar.close()
    means = [s / (step + 1) for s in sums.tolist()]
    return means, seen


def train(cfg):
    """The run in its folder (runner.Folder): each epoch trains, evaluates, makes the next epoch's
    prototypes, audits the mixed set and is checkpointed."""
    with runner.Folder(cfg, run_name(cfg)) as folder:
        run = setup(cfg)
        suspects = audit.Suspects.new(run, folder.ckpt)
        use_con, protos = cfg["w_con"] > 0, None
        for epoch in range(folder.restore(run), folder.epochs()):
            t0 = time.time()
            # made by the previous epoch's audit, except in a run's first epoch
            if use_con and protos is None:
                protos = prototypes(run, data.stream_seed(cfg["seed"], epoch, "prototypes"))
            lr = run.opt.param_groups[0]["lr"]
            (loss, loss_cls, loss_con), seen = train_epoch(run, cfg, epoch, protos, suspects,
                                                           folder)
            run.sched.step()
            train_s = time.time() - t0
            ev = evaluate(run)
            epoch_suspects = suspects.end_epoch(run)
            audited, t1 = {}, time.time()
            # The next epoch's prototypes, made now: they are the ones it would make itself (same
            # weights, same seed), and the audit measures every sample against them.
            protos = None
            if use_con:
                protos = prototypes(run, data.stream_seed(cfg["seed"], epoch + 1, "prototypes"))
            if use_con and run.mixed.is_syn.any():
                audited = audit.epoch_audit(run, cfg, protos, suspects, epoch_suspects)
                audited["audit_s"] = time.time() - t1
            detected = report.detector(epoch_suspects, run.mixed) if use_con else {}
            folder.epoch_done(run, {
                "epoch": epoch + 1, "lr": lr, "loss": loss, "loss_cls": loss_cls,
                "loss_con": loss_con, "suspect_frac": None, **detected,
                **{k: ev[k] for k in ("top1", "top5", *data.GROUPS)},
                "seconds": time.time() - t0, "images_per_s": seen / train_s, **audited},
                ev, suspects.state())
        folder.finish(run, suspects.total.numpy(), suspects.scores)
        return folder.out


# ---------------------------------------------------------------- prototypes and evaluation


def project_views(run, batch, names=("v2", "v3")):
    """[B, V, D]: the batch's views through the backbone and the projection head (autocast)."""
    made = run.batches.views.apply(batch.images, batch.draws)
    with torch.autocast(run.device.type, torch.bfloat16, enabled=run.amp):
        return torch.stack([run.model.project(run.model.features(run.prep(made[v])))
                            for v in names], 1)


@torch.no_grad()
def prototypes(run, seed):
    """[C, 2, D]: per class, the mean projection of its real images' v2 and v3 (eval mode)."""
    model, device = run.model, run.device
    model.eval()
    num_classes = len(run.mixed.classes)
    sums = torch.zeros(num_classes, 2, model.proj[-1].out_features, device=device)
    counts = torch.zeros(num_classes, device=device)
    for batch in run.batches(("v2", "v3"), 256, seed, run.real):
        z = project_views(run, batch)
        sums.index_add_(0, batch.y, z.float())  # C x 2 x D
        counts.index_add_(0, batch.y, torch.ones_like(batch.y, dtype=torch.float))
    return sums / counts.clamp(min=1)[:, None, None]


@torch.no_grad()
def confusion_counts(run):
    """(confusion [C * C], top-5 hits) of the classifier head on the test set, on the device."""
    model, device, num_classes = run.model, run.device, len(run.mixed.classes)
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    top5_hits = torch.zeros((), dtype=torch.long, device=device)
    x_test, y_test = run.test
    for i, x in run.plain(x_test):
        y = y_test[i:i + len(x)].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=run.amp):
            top5 = model.fc(model.features(x)).float().topk(min(5, num_classes), 1).indices
        confusion.index_add_(0, y * num_classes + top5[:, 0], torch.ones_like(y))
        top5_hits += (top5 == y[:, None]).any(1).sum()
    return confusion, top5_hits


def evaluate(run):
    """Top-1, top-5, per-class accuracy, many/medium/few and the confusion matrix (test set)."""
    n_real, (confusion, top5_hits) = run.mixed.n_real, confusion_counts(run)
    confusion = confusion.reshape(len(n_real), len(n_real)).cpu()
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    groups = {g: [a for a, n in zip(per_class, n_real) if data.shot_group(n) == g]
              for g in data.GROUPS}
    n_test = len(run.test[1])
    return {"top1": 100 * confusion.diag().sum().item() / n_test,
            "top5": 100 * top5_hits.item() / n_test,
            **{g: 100 * sum(v) / len(v) if v else None for g, v in groups.items()},
            "per_class": [100 * a for a in per_class], "confusion": confusion.tolist()}


# ---------------------------------------------------------------- set-up


def optimizer(model, cfg):
    """SGD with momentum and weight decay, the learning rate cosine-annealed per epoch to 0."""
    # foreach: a few multi-tensor ops a step, as torch does on CUDA anyway (the same numbers)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                          weight_decay=cfg["weight_decay"], foreach=True)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"])


def setup(cfg):
    """runner.Run: the device, the data and the network (runner.setup), the optimiser, the Step."""
    run = runner.setup(cfg)
    run.opt, run.sched = optimizer(run.model, cfg)
    n_real, n_syn = (torch.tensor(n, device=run.device) for n in (run.mixed.n_real,
                                                                  run.mixed.n_syn))
    step = Step(run.model, cfg, n_real, n_syn, run.batches.views, run.fmt)
    # the whole step, views and backward included; one more graph for a short last batch
    run.step_fn = runner.compiled(step) if cfg["compile"] == "on" else step
    return run


def streams(run, cfg, epoch):
    """The epoch's (batch A, batch B): A with the views the branches need, B (v1) the partners of
    the classifier's mixing, None without it."""
    use_cls = cfg["w_cls"] > 0
    views_a = (("v1",) if use_cls else ()) + (("v2", "v3") if cfg["w_con"] > 0 else ())
    return data.train_streams(run.mixed, cfg["batch_size"], cfg["seed"], epoch, views_a, use_cls,
                              run.batches)


def benchmark(cfg):
    """--bench: the step, its data path alone and a prototype pass timed (bench.py), nothing
    written; random unit vectors stand in for the prototypes."""
    run = setup(cfg)
    mix = mix_draws(np.random.default_rng(0), 1, cfg["mix_alpha"])[0].to(run.device)
    protos = F.normalize(torch.randn(len(run.mixed.classes), 2, run.model.proj[-1].out_features,
                                     device=run.device), dim=-1)
    counts = torch.zeros(len(run.mixed), dtype=torch.int32, device=run.device)
    pairs = lambda: (ab for e in itertools.count() for ab in streams(run, cfg, e))
    inputs = lambda ab: step_inputs(cfg, *ab, mix, protos)
    real = lambda: (b for e in itertools.count()
                    for b in run.batches(("v2", "v3"), 256, e, run.real))
    return bench.bench(cfg, run, step=(pairs, lambda ab: train_step(run, inputs(ab), counts)),
                       data=(pairs, inputs), forward=(real, lambda b: project_views(run, b)))


# ---------------------------------------------------------------- the command line


def get_config(argv=None):
    """The command's settings, parsed and checked; with --resume, those not given are the run's."""
    cfg = cli.parse_settings(CONFIG, IGNORED, __doc__, argv, runner.resumed(CONFIG),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    if cfg["w_cls"] == cfg["w_con"] == 0:
        raise cli.SAUError("--w-cls and --w-con are both 0: nothing to train")
    return cfg


def run_name(cfg, seed=True):
    return cli.run_name(CONFIG, cfg, seed)


def main(argv=None):
    cli.one_process("train.py is one process on one device: for several GPUs run a grid with "
                    "python table.py (a run on each GPU), or one run a GPU with --device cuda:N")
    cfg = get_config(argv)
    if cfg["summarize"]:
        return report.summarize(CONFIG, cfg["summarize"], cfg["out"])
    return benchmark(cfg) if cfg["bench"] else train(cfg)


if __name__ == "__main__":
    cli.run_cli(main)
