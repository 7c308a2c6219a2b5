"""How train.py's runs are run, out of the method's way: the runtime and one-command settings, the
processes, the run folder (refuse or resume, the lock, checkpoint.pt, config.json, metrics.jsonl,
the start line), the non-finite stop and --bench's timing.

checkpoint.pt is the folder's state: it holds all that the next epoch and the reports need and is
replaced in one rename per epoch; config.json, metrics.jsonl, final.json and the pictures are
derived from it and rebuilt by --resume, so a kill at any instant leaves a folder that --resume
finishes.
"""
import dataclasses
import itertools
import json
import math
import os
import time
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import cli
import data
import report
import views
from model import resnet32

S, ON_OFF = cli.Setting, ("on", "off")
# train.py's settings of how a run is computed: the implementation choices named in the run (amp,
# loader, sync_bn), those that change only speed or rounding ("runtime": kept on --resume unless
# given) and those of one command ("call").
RUNTIME_CONFIG = {
    "amp": S("auto", "bf16 autocast: auto (on CUDA, and on a CPU with native bf16) | bf16 | off",
             choices=("auto", "bf16", "off")),
    "loader": S("auto", "auto (gpu on CUDA, else cpu) | cpu: DataLoader workers + torchvision, as "
                "the paper | gpu: the set held on the device, views as batched tensor ops (ours)",
                choices=("auto", "cpu", "gpu")),
    "sync_bn": S("off", "with torchrun: off: BatchNorm statistics per process, as the paper | on: "
                 "over all", choices=ON_OFF, tag="syncbn"),
    "device": cli.DEVICE,
    "workers": S(-1, "DataLoader worker processes (--loader cpu); -1: 0 on a CPU device (fastest "
                 "there, measured), min(8, CPUs) on CUDA", (lambda v: v >= -1, ">= -1"),
                 scope="runtime"),
    "channels_last": S("on", "channels_last memory format for the network (ours)",
                       choices=ON_OFF, scope="runtime"),
    "compile": S("off", "torch.compile the backbone (ours)", choices=ON_OFF, scope="runtime"),
    "deterministic": S("off", "on: deterministic CUDA kernels, so a resumed CUDA run ends with the "
                       "same weights as an uninterrupted one (CPU runs always do); somewhat slower "
                       "(ours)", choices=ON_OFF, scope="runtime"),
    "bench": S(0, "time this many steps after warm-up with the run's flags, print the figures "
               "and exit (ours)", cli.NON_NEGATIVE, scope="call"),
    "out": S("", "run folder; empty: runs/<name from the settings that differ from the defaults>",
             scope="call"),
    "resume": S("", "continue the run in this folder; flags not given are taken from it",
                scope="call"),
    "summarize": S(None, "mean and std of finished runs' final metrics over seeds (writes --out or "
                   "runs/summary_<name>.md/.json) and exit", scope="call", type=str, nargs="+"),
    "stop_after": S(0, "leave after this many epochs in total, checkpoint kept (for time-limited "
                    "jobs; ours)", cli.NON_NEGATIVE, scope="call"),
}
RUNTIME_IGNORED = [
    ("workers", lambda c: c["loader"] == "gpu", "with --loader gpu"),
    ("sync_bn", lambda c: cli.rank_and_world()[1] == 1,
     "with one process (it acts under torchrun)"),
]


# ---------------------------------------------------------------- processes


def all_sum(t, world, op="SUM"):
    if world > 1:
        torch.distributed.all_reduce(t, getattr(torch.distributed.ReduceOp, op))
    return t


def eval_mode(model, world):
    """model.eval() with rank 0's BatchNorm statistics on every process (DDP sends them only at a
    training forward, and each process's last one moves its own): the model each process
    evaluates is the one the checkpoint saves."""
    model.eval()
    for b in model.buffers() if world > 1 else ():
        torch.distributed.broadcast(b, 0)


# ---------------------------------------------------------------- set-up


@dataclasses.dataclass
class Run:
    """What a run holds from set-up to its end."""
    world: int  # processes (torchrun's WORLD_SIZE; 1 without it)
    rank: int  # this process's (RANK)
    device: torch.device  # "cuda", "cuda:N" (LOCAL_RANK under torchrun) or "cpu"
    amp: bool  # bf16 autocast on
    loader: str  # "cpu" (DataLoader workers, torchvision) or "gpu" (batched views on the device)
    prep: Callable  # a batch to the device, in the network's memory format
    mixed: data.MixedSet  # the training set: real + synthetic, with is_syn and is_noisy
    real_share: object  # this process's real images, for the prototypes (device tensor or list)
    batches: Callable  # data.batch_maker's: (views, batch size, seed, order) -> batches
    x_test: torch.Tensor  # uint8 [10000, 3, 32, 32] on the host
    y_test: torch.Tensor
    x_train: torch.Tensor  # uint8 [N, 3, 32, 32]: the gpu loader's device copy, else a host view
    y_train: torch.Tensor  # [N] on the device
    mean: torch.Tensor  # [3, 1, 1] normalisation constants on the device (views.MEAN_STD)
    std: torch.Tensor
    model: torch.nn.Module  # the ResNet-32 (its backbone compiled with --compile on)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    use_cls: bool  # --w-cls > 0: the classification branch runs
    use_con: bool  # --w-con > 0: the contrastive branch and its prototypes run
    step_fn: torch.nn.Module  # train.Step, in DistributedDataParallel under torchrun


def setup(cfg, step_class, optimizer):
    """All a run holds before its first step: processes, device, data, the ResNet-32, the
    optimiser and its schedule (optimizer(model, cfg)) and the step (step_class)."""
    rank, world = cli.rank_and_world()
    if world > 1 and cfg["batch_size"] % world:
        raise cli.SAUError(f"--batch-size {cfg['batch_size']} does not split over {world} "
                           f"processes")
    device = cli.use_device(cfg["device"], cfg["deterministic"] == "on")
    cuda = device.type == "cuda"
    if cfg["sync_bn"] == "on" and not cuda:
        raise cli.SAUError("--sync-bn on needs CUDA (torch's SyncBatchNorm runs on GPUs only): "
                           "drop it on a CPU")
    if world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    amp = cfg["amp"] == "bf16" or (cfg["amp"] == "auto" and (cuda or cli.cpu_has_bf16()))
    loader = cfg["loader"] if cfg["loader"] != "auto" else "gpu" if cuda else "cpu"
    workers = cfg["workers"]
    if workers < 0:
        workers = min(8, os.cpu_count() or 1) if cuda else 0
    fmt = torch.channels_last if cfg["channels_last"] == "on" else torch.contiguous_format

    mixed = data.build_mixed(**{k: cfg[k] for k in data.DATA_CONFIG})
    real = torch.from_numpy(np.flatnonzero(~mixed.is_syn))[rank::world]  # this process's
    batches = data.batch_maker(mixed, loader, device, workers)
    x_test, y_test = data.load_cifar(cfg["dataset"], cfg["data_root"], train=False)
    mean, std = views.mean_std(cfg["dataset"], device)

    torch.manual_seed(cfg["seed"])
    model = resnet32(len(mixed.classes), cfg["width"]).to(device, memory_format=fmt)
    # the backbone only: the heads are small and the loss has masks, not shapes
    if cfg["compile"] == "on":
        model.features = torch.compile(model.features)
    opt, sched = optimizer(model, cfg)
    n_real, n_syn = (torch.tensor(n, device=device) for n in (mixed.n_real, mixed.n_syn))
    step_fn = step_class(model, cfg, n_real, n_syn)
    if world > 1:
        if cfg["sync_bn"] == "on":
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        both = cfg["w_cls"] > 0 and cfg["w_con"] > 0
        step_fn = torch.nn.parallel.DistributedDataParallel(step_fn,
                                                            find_unused_parameters=not both)
    host_view = torch.from_numpy(mixed.images).permute(0, 3, 1, 2)  # no copy
    return Run(world=world, rank=rank, device=device, amp=amp, loader=loader,
               prep=lambda x: x.to(device, non_blocking=True).contiguous(memory_format=fmt),
               mixed=mixed, real_share=real.to(device) if loader == "gpu" else real.tolist(),
               batches=batches, x_test=torch.from_numpy(x_test).permute(0, 3, 1, 2),
               y_test=torch.from_numpy(y_test), x_train=getattr(batches, "images", host_view),
               y_train=torch.from_numpy(mixed.labels).to(device), mean=mean, std=std,
               model=model, opt=opt, sched=sched,
               use_cls=cfg["w_cls"] > 0, use_con=cfg["w_con"] > 0, step_fn=step_fn)


def plain_batches(run, images, batch_size=1000):
    """(start, x): this process's share of uint8 [N, 3, 32, 32] images (host or device),
    unaugmented, normalised on the device."""
    for i in range(run.rank * batch_size, len(images), run.world * batch_size):
        x = images[i:i + batch_size].to(run.device)
        yield i, run.prep(views.normalize(x, run.mean, run.std))


# ---------------------------------------------------------------- the run folder


class Folder:
    """The run's folder, held (its lock) from `with` to the end: a run that exists is refused
    without --resume, and resumed with it (ckpt); config.json and metrics.jsonl are rebuilt, each
    epoch's end is one checkpoint, and a Ctrl-C ends in one line that says how to go on."""

    def __init__(self, cfg, name, table):
        self.cfg, self.table = cfg, table
        self.out = cfg["out"] or os.path.join("runs", name)
        self.main = cli.rank_and_world()[0] == 0
        self.metrics, self.ev, self.lock, self.ckpt, self.stopped = [], None, None, None, False

    def __enter__(self):
        out, cfg = self.out, self.cfg
        # the folders this run makes (runs/ and runs/<name>, say), to take back if it is refused
        self.created = []
        path = os.path.abspath(out)
        while not os.path.exists(path):
            self.created.append(path)
            path = os.path.dirname(path)
        self.lock = cli.own(out) if self.main else None
        try:
            if not cfg["resume"] and os.path.exists(os.path.join(out, "checkpoint.pt")):
                raise cli.SAUError(f"{out} already holds a run: continue it with --resume {out}, "
                                   f"or pass a new --out")
            self.ckpt = load_checkpoint(out, self.table, cfg) if cfg["resume"] else None
        except BaseException as e:
            self.__exit__(type(e), e, None)
            raise
        return self

    def __exit__(self, kind, error, tb):
        self.release()
        # a run refused before its first file (a missing pool, say) leaves no folder behind
        if kind and self.created and self.main and os.listdir(self.out) == ["lock"]:
            os.remove(os.path.join(self.out, "lock"))
            for path in self.created:
                os.rmdir(path)
        how = f"the last finished epoch is kept: continue with python train.py --resume {self.out}"
        # an error a Ctrl-C set off (a DataLoader worker it stopped first) is the interrupt too
        if kind and (issubclass(kind, KeyboardInterrupt)
                     or issubclass(kind, Exception) and cli.interrupted()):
            raise KeyboardInterrupt(how) from None
        return False

    def release(self):
        # a clean end (an error included) leaves an empty lock file; a killed run leaves its pid
        if self.lock:
            self.lock.truncate(0)
            self.lock.close()
            self.lock = None

    def epochs(self, run):
        """The epochs still to train: the checkpoint's weights, optimiser and schedule restored,
        config.json and metrics.jsonl written, the start line printed; --stop-after ends early."""
        cfg, start = self.cfg, 0
        if self.ckpt:
            run.model.load_state_dict(self.ckpt["model"])
            run.opt.load_state_dict(self.ckpt["optimizer"])
            run.sched.load_state_dict(self.ckpt["scheduler"])
            start, self.metrics, self.ev = (self.ckpt[k] for k in ("epoch", "metrics", "eval"))
        if self.main:
            config = {k: v for k, v in cfg.items() if k != "resume"}
            cli.write_atomic(os.path.join(self.out, "config.json"), json.dumps(config, indent=1))
            write_metrics(self.out, self.metrics)
            print(start_line(self.out, cfg, run, start), flush=True)
        for epoch in range(start, cfg["epochs"]):
            if cfg["stop_after"] and epoch >= cfg["stop_after"]:
                if self.main:
                    print(f"stopping after epoch {epoch} (--stop-after); continue with --resume "
                          f"{self.out}")
                self.stopped = True
                return
            yield epoch

    def epoch_done(self, run, metrics, ev, suspects):
        """The epoch's metrics line and its checkpoint: one rename, then metrics.jsonl from it."""
        mixed = run.mixed
        self.ev = {**ev, "n_real": mixed.n_real, "n_syn": mixed.n_syn, "classes": mixed.classes}
        self.metrics.append(metrics)
        if not self.main:
            return
        report.print_epoch(metrics, self.cfg["epochs"])
        state = {"model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
                 "scheduler": run.sched.state_dict(), "epoch": metrics["epoch"],
                 "config": self.cfg, "metrics": self.metrics, "eval": self.ev, **suspects}
        cli.write_atomic(os.path.join(self.out, "checkpoint.pt"), lambda p: torch.save(state, p))
        write_metrics(self.out, self.metrics)

    def finish(self, run, flagged, scores):
        """final.json and the pictures (report.write_final), also for a run resumed when done."""
        if self.main and not self.stopped:
            report.write_final(self.out, self.cfg, self.metrics, self.ev, run.mixed, flagged,
                               scores)


def load_checkpoint(out, table, cfg=None):
    """The run's checkpoint, or None where the run has none yet (killed in its first epoch); given
    cfg, refused if the run was made with settings that shape the results otherwise."""
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle: the same message
        raise cli.SAUError(f"checkpoint {path} is unreadable ({e.__class__.__name__}): delete it "
                           f"and start again") from None
    diff = cli.config_diff(table, ckpt["config"], cfg) if cfg else []
    if diff:
        was = ", ".join(f"{cli.flag(k)} {ckpt['config'].get(k, table[k].default)} (now {cfg[k]})"
                        for k in diff)
        raise cli.SAUError(f"checkpoint {path} was made with another config: {was}; resume with "
                           f"the same flags or start a new --out")
    return ckpt


def resumed(table):
    """parse_settings' hook for --resume: the flags not given now are the run's own, its runtime
    choices too (from config.json, or from the checkpoint where config.json is gone)."""
    def settings(cfg, given):
        if "resume" in given and not cfg["resume"].strip():
            raise cli.SAUError("--resume needs the run's folder, got an empty name (an unset "
                               "variable?): pass --resume runs/<name>")
        if not cfg["resume"]:
            return cfg
        path = os.path.join(cfg["resume"], "config.json")
        if os.path.isfile(path):
            saved = cli.read_json(path)
        elif os.path.isfile(os.path.join(cfg["resume"], "checkpoint.pt")):
            path = os.path.join(cfg["resume"], "checkpoint.pt")
            saved = load_checkpoint(cfg["resume"], table)["config"]
        else:
            raise cli.SAUError(f"--resume {cfg['resume']}: no config.json there, so no run to "
                               f"continue")
        if not isinstance(saved, dict):
            raise cli.SAUError(f"{path} holds a JSON {type(saved).__name__}, not a run's settings: "
                               f"restore it (its run's checkpoint.pt holds them too)")
        kept = {k: v for k, v in saved.items() if k in table and table[k].scope != "call"}
        for k, v in kept.items():
            wrong = cli.wrong_value(table[k], v)
            if wrong:
                raise cli.SAUError(f"{path}: {k} is {v!r}, {wrong}: restore the value the run was "
                                   f"made with")
        return {**cfg, **kept, **given, "out": cfg["resume"]}
    return settings


def write_metrics(out, metrics):
    cli.write_atomic(os.path.join(out, "metrics.jsonl"),
                     "".join(json.dumps(r) + "\n" for r in metrics))


def start_line(out, cfg, run, start):
    mixed, epochs = run.mixed, cfg["epochs"]
    kept = " ".join(f"{cli.flag(k)} {cfg[k]}" for k, s in RUNTIME_CONFIG.items()
                    if s.scope == "runtime" and cfg[k] != s.default) or "the defaults"
    where = f"{run.device}{' bf16' if run.amp else ''}, loader {run.loader}"
    where += f" x {run.world} processes" if run.world > 1 else ""
    todo = (f"epochs {start + 1}-{epochs}" if start < epochs
            else f"all {start} epochs done: its files are rebuilt from the checkpoint")
    resumed = f"; resumed, runtime settings (the run's unless given now): {kept}"
    return (f"{out}: {len(mixed)} training images ({sum(mixed.n_real)} real, "
            f"{sum(mixed.n_syn)} synthetic), {len(mixed.classes)} classes, {where}, {todo}"
            + (resumed if cfg["resume"] else ""))


def check_finite(bad_step, epoch, out, world=1, model=None):
    """Stop at a non-finite loss (bad_step: its first step, or -1) or, given the model, at
    non-finite weights: what is saved is always finite. Decided over all processes, so that they
    stop together."""
    bad_weights = torch.zeros((), device=bad_step.device)
    if model is not None:
        finite = [t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()]
        bad_weights = (~torch.stack(finite).all()).float()
    worst = all_sum(torch.stack([bad_step.float(), bad_weights]), world, "MAX").tolist()
    if worst[0] < 0 and not worst[1]:
        return
    what = (f"loss at epoch {epoch + 1}, step {int(worst[0])}" if worst[0] >= 0
            else f"weights after epoch {epoch + 1}")
    kept = f"epoch {epoch}" if epoch else "none yet"
    raise cli.SAUError(f"non-finite {what}: stopped; the last good checkpoint ({kept}) is kept in "
                       f"{out}; try a lower --lr")


# ---------------------------------------------------------------- --bench


def timed(batches, work, n, warmup, device, begin=lambda: None):
    """Seconds per batch of work over n batches after warmup ones."""
    it = iter(batches)
    for i in range(warmup + n):
        if i == warmup:
            cli.synchronize(device)
            begin()
            t = time.perf_counter()
        work(next(it))
    cli.synchronize(device)
    return (time.perf_counter() - t) / n


def bench(cfg, run, streams, step_inputs, train_step, project_views, warmup=3):
    """--bench: time the whole step, its data path alone and the forward-only passes (the
    prototypes' and the test set's) with the run's flags, with peak memory and, on CUDA, the host
    syncs of the timed steps; print the figures and the projected schedule, and return them.
    Writes nothing. The other arguments are train.py's functions of those names."""
    rng = np.random.default_rng(0)
    num_classes, dim = len(run.mixed.classes), run.model.proj[-1].out_features
    protos = F.normalize(torch.randn(num_classes, 2, dim, device=run.device), dim=-1)
    counts = torch.zeros(len(run.mixed), dtype=torch.int32, device=run.device)
    warmup += 7 * (cfg["compile"] == "on")  # compilation, and a recompilation for the eval graph
    # as many steps as asked for, over epochs
    pairs = lambda: (ab for e in itertools.count() for ab in streams(run, cfg, e))
    inputs = lambda ab: step_inputs(run, cfg, *ab, rng, protos)
    step = lambda ab: train_step(run, inputs(ab), counts)
    # a prototype batch: two views of real images through backbone and projection head
    real = np.flatnonzero(~run.mixed.is_syn).tolist()
    real *= 1 + (warmup + cfg["bench"]) * 256 // max(len(run.mixed.n_real), 1)
    forward = (run.batches(("v2", "v3"), 256, 0, real),
               lambda b: project_views(run, b.views["v2"], b.views["v3"]))
    n, device, cuda = cfg["bench"], run.device, run.device.type == "cuda"
    # CUDA: every host sync inside a timed step warns once (not the warm-up's copies and
    # compilation)
    with warnings.catch_warnings(record=True) as syncs:
        warnings.simplefilter("always")
        try:
            step_s = timed(pairs(), step, n, warmup, device,
                           begin=lambda: cli.sync_debug(device, "warn"))
        finally:
            cli.sync_debug(device, "default")
    syncs = sum("synchroniz" in str(w.message) for w in syncs) if cuda else None
    data_s = timed(pairs(), inputs, n, warmup, device)
    run.model.eval()
    with torch.no_grad():
        proto_s = timed(*forward, n, warmup, device)
    bs, steps = cfg["batch_size"] // run.world, math.ceil(len(run.mixed) / cfg["batch_size"])
    # per epoch: the steps, the prototypes (real images, two views, batches of 256) and the test
    # set (one view, about half the cost)
    passes = math.ceil(sum(run.mixed.n_real) / 256) * run.use_con + len(run.y_test) / 512
    epoch_s = steps * step_s + passes * proto_s
    name, peak = cli.device_figures(device)
    res = {"device": name, "loader": run.loader, "amp": "bf16" if run.amp else "off",
           "width": cfg["width"], "batch_size": bs, "channels_last": cfg["channels_last"],
           "compile": cfg["compile"], "steps_timed": n, "step_images_per_s": bs / step_s,
           "data_images_per_s": bs / data_s, "data_fraction": data_s / step_s,
           "forward_images_per_s": 2 * 256 / proto_s, "epoch_s": epoch_s,
           "run_s": epoch_s * cfg["epochs"], "peak": peak, "host_syncs_in_timed_steps": syncs}
    print(f"bench ({name}; loader {run.loader}, amp {res['amp']}, channels_last "
          f"{cfg['channels_last']}, compile {cfg['compile']}, width {cfg['width']}, batch {bs}; "
          f"{n} steps after {warmup} warm-up):\n"
          f"  whole step      {bs / step_s:8.1f} images/s  ({1000 * step_s:.1f} ms/step)\n"
          f"  data path alone {bs / data_s:8.1f} images/s  ({100 * data_s / step_s:.1f}% of a "
          f"step)\n"
          f"  prototype/test forward passes {2 * 256 / proto_s:.1f} images/s; peak memory {peak}; "
          f"host syncs in the timed steps: {'-' if syncs is None else syncs}\n"
          f"  projected: {epoch_s:.1f} s per epoch, {cfg['epochs']} epochs "
          f"{epoch_s * cfg['epochs'] / 60:.1f} min ({steps} steps, prototypes and test set each "
          f"epoch)")
    print("bench_json " + json.dumps(res))
    return res
