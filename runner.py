"""How train.py's runs are run, around the method: the runtime and one-command settings, the set-up
(processes, device, data, network), the run folder and --bench. checkpoint.pt is the folder's
state, replaced in one rename per epoch; every other file is derived from it and rebuilt by
--resume, so a kill at any instant leaves a folder that --resume finishes.
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
    "compile": S("off", "torch.compile the training step, views included (ours)", choices=ON_OFF,
                 scope="runtime"),
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


# ---------------------------------------------------------------- set-up


@dataclasses.dataclass
class Run:
    """What a run holds from set-up to its end, and what its processes do together."""
    world: int  # processes (torchrun's WORLD_SIZE; 1 without it)
    rank: int  # this process's (RANK)
    device: torch.device  # "cuda", "cuda:N" (LOCAL_RANK under torchrun) or "cpu"
    amp: bool  # bf16 autocast on
    loader: str  # "cpu" (DataLoader workers, torchvision) or "gpu" (batched views on the device)
    prep: Callable  # a batch to the device, in the network's memory format
    mixed: data.MixedSet  # the training set: real + synthetic, with is_syn and is_noisy
    batches: data.Batches  # (views, batch size, seed, order) -> views.Batch; .images: the set
    real: object  # this process's real images for the prototypes (on the device: gpu loader)
    test: tuple  # (uint8 [10000, 3, 32, 32], labels [10000]) on the host
    model: torch.nn.Module  # the ResNet-32
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    step_fn: torch.nn.Module  # train.Step (in DDP under torchrun; compiled with --compile on)

    def sum(self, t, op="SUM"):  # over the processes, in place
        if self.world > 1:
            torch.distributed.all_reduce(t, getattr(torch.distributed.ReduceOp, op))
        return t

    def eval(self):
        """model.eval() with rank 0's BatchNorm statistics on every process (DDP sends them only at
        a training forward): each process evaluates the model the checkpoint saves."""
        self.model.eval()
        for b in self.model.buffers() if self.world > 1 else ():
            torch.distributed.broadcast(b, 0)

    def plain(self, images, batch_size=1000):
        """(start, x): this process's share of uint8 [N, 3, 32, 32] images, normalised."""
        mean, std = views.mean_std(self.mixed.dataset, self.device)
        for i in range(self.rank * batch_size, len(images), self.world * batch_size):
            x = images[i:i + batch_size].to(self.device)
            yield i, self.prep(views.normalize(x, mean, std))


def setup(cfg, step_class, optimizer):
    """The Run: processes, device, data, the ResNet-32, optimizer(model, cfg), step_class."""
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
    workers = cfg["workers"] if cfg["workers"] >= 0 else min(8, os.cpu_count() or 1) * cuda
    fmt = torch.channels_last if cfg["channels_last"] == "on" else torch.contiguous_format

    mixed = data.build_mixed(**{k: cfg[k] for k in data.DATA_CONFIG})
    real = torch.from_numpy(np.flatnonzero(~mixed.is_syn))[rank::world]
    x_test, y_test = data.load_cifar(cfg["dataset"], cfg["data_root"], train=False)
    torch.manual_seed(cfg["seed"])
    model = resnet32(len(mixed.classes), cfg["width"]).to(device, memory_format=fmt)
    opt, sched = optimizer(model, cfg)
    n_real, n_syn = (torch.tensor(n, device=device) for n in (mixed.n_real, mixed.n_syn))
    batches = data.Batches(mixed, loader, device, workers)
    step_fn = step_class(model, cfg, n_real, n_syn, batches.finish, fmt)
    if world > 1:
        if cfg["sync_bn"] == "on":
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        both = cfg["w_cls"] > 0 and cfg["w_con"] > 0
        step_fn = torch.nn.parallel.DistributedDataParallel(step_fn,
                                                            find_unused_parameters=not both)
    # the whole step: the views' pure part, the four passes, both losses, the relabel rule (and,
    # by AOTAutograd, the backward); static shapes, one more graph for a short last batch
    if cfg["compile"] == "on":
        step_fn = torch.compile(step_fn)
    return Run(world=world, rank=rank, device=device, amp=amp, loader=loader,
               prep=lambda x: x.to(device, non_blocking=True).contiguous(memory_format=fmt),
               mixed=mixed, batches=batches,
               real=real.to(device) if loader == "gpu" else real.tolist(),
               test=(torch.from_numpy(x_test).permute(0, 3, 1, 2), torch.from_numpy(y_test)),
               model=model, opt=opt, sched=sched, step_fn=step_fn)


# ---------------------------------------------------------------- the run folder


class Folder:
    """The run's folder, held (its lock) from `with` to the end: a run that exists is refused
    without --resume, and resumed with it (ckpt); a Ctrl-C ends in one line that says how to go
    on."""

    def __init__(self, cfg, name):
        self.cfg, self.out = cfg, cfg["out"] or os.path.join("runs", name)
        self.main = cli.rank_and_world()[0] == 0
        self.metrics, self.ev, self.ckpt, self.done = [], None, None, 0

    def __enter__(self):
        self.lock = cli.own(self.out) if self.main else None
        try:  # a refused run (or an unreadable checkpoint) releases the lock as it leaves
            if not self.cfg["resume"] and os.path.exists(os.path.join(self.out, "checkpoint.pt")):
                raise cli.SAUError(f"{self.out} already holds a run: continue it with --resume "
                                   f"{self.out}, or pass a new --out")
            self.ckpt = load_checkpoint(self.out) if self.cfg["resume"] else None
        except BaseException as e:
            self.__exit__(type(e), e, None)
            raise
        return self

    def __exit__(self, kind, error, tb):
        # a clean end (an error included) leaves an empty lock file; a killed run leaves its pid
        if self.lock:
            self.lock.truncate(0)
            self.lock.close()
            self.lock = None
        if kind and issubclass(kind, KeyboardInterrupt):
            raise KeyboardInterrupt(f"the last finished epoch is kept: continue with python "
                                    f"train.py --resume {self.out}") from None

    def restore(self, run):
        """The first epoch to train, the checkpoint restored; config.json and metrics.jsonl
        written, the start line printed."""
        if self.ckpt:
            run.model.load_state_dict(self.ckpt["model"])
            run.opt.load_state_dict(self.ckpt["optimizer"])
            run.sched.load_state_dict(self.ckpt["scheduler"])
            self.done, self.metrics, self.ev = (self.ckpt[k] for k in ("epoch", "metrics", "eval"))
        if self.main:
            config = {k: v for k, v in self.cfg.items() if k != "resume"}
            cli.write_atomic(os.path.join(self.out, "config.json"), json.dumps(config, indent=1))
            write_metrics(self.out, self.metrics)
            print(start_line(self.out, self.cfg, run, self.done), flush=True)
        return self.done

    def epochs(self):  # the end of this command's epochs: --stop-after ends early
        return min(self.cfg["epochs"], self.cfg["stop_after"] or self.cfg["epochs"])

    def epoch_done(self, run, metrics, ev, suspects):
        """The epoch's line and its checkpoint (one rename), then metrics.jsonl."""
        mixed, self.done = run.mixed, metrics["epoch"]
        self.ev = {**ev, "n_real": mixed.n_real, "n_syn": mixed.n_syn, "classes": mixed.classes}
        self.metrics.append(metrics)
        if not self.main:
            return
        report.print_epoch(metrics, self.cfg["epochs"])
        state = {"model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
                 "scheduler": run.sched.state_dict(), "epoch": self.done,
                 "config": self.cfg, "metrics": self.metrics, "eval": self.ev, **suspects}
        cli.write_atomic(os.path.join(self.out, "checkpoint.pt"), lambda p: torch.save(state, p))
        write_metrics(self.out, self.metrics)

    def finish(self, run, flagged, scores):
        """final.json and the pictures, also for a run resumed when done."""
        if not self.main:
            return
        if self.done < self.cfg["epochs"]:
            print(f"stopping after epoch {self.done} (--stop-after); continue with --resume "
                  f"{self.out}")
        else:
            report.write_final(self.out, self.cfg, self.metrics, self.ev, run.mixed, flagged,
                               scores)

    def check_finite(self, run, bad_step, epoch, weights=False):
        """Stop at a non-finite loss (bad_step: its first step, or -1) or, with weights, at
        non-finite weights, decided over all processes: what is saved is always finite."""
        bad_weights = torch.zeros((), device=bad_step.device)
        if weights:
            finite = [t.isfinite().all() for t in run.model.state_dict().values()
                      if t.is_floating_point()]
            bad_weights = (~torch.stack(finite).all()).float()
        worst = run.sum(torch.stack([bad_step.float(), bad_weights]), "MAX").tolist()
        if worst[0] < 0 and not worst[1]:
            return
        what = (f"loss at epoch {epoch + 1}, step {int(worst[0])}" if worst[0] >= 0
                else f"weights after epoch {epoch + 1}")
        kept = f"epoch {epoch}" if epoch else "none yet"
        raise cli.SAUError(f"non-finite {what}: stopped; the last good checkpoint ({kept}) is "
                           f"kept in {self.out}; try a lower --lr")


def load_checkpoint(out, mmap=False):
    """The run's checkpoint, or None (a run killed in its first epoch has none)."""
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, bad pickle: the same message
        raise cli.SAUError(f"checkpoint {path} is unreadable ({e.__class__.__name__}): delete it "
                           f"and start again") from None


def resumed(table):
    """parse_settings' hook for --resume: the flags not given are the run's (from its checkpoint,
    or config.json before the first), runtime ones too; one that shapes the results otherwise is
    refused."""
    def settings(cfg, given):
        folder = cfg["resume"]
        if "resume" in given and not folder.strip():
            raise cli.SAUError("--resume needs the run's folder, got an empty name (an unset "
                               "variable?): pass --resume runs/<name>")
        if not folder:
            return cfg
        ckpt = load_checkpoint(folder, mmap=True)
        if ckpt is None and not os.path.isfile(os.path.join(folder, "config.json")):
            raise cli.SAUError(f"--resume {folder}: no config.json there, so no run to continue")
        saved = ckpt["config"] if ckpt else cli.read_json(os.path.join(folder, "config.json"))
        kept = {k: v for k, v in saved.items() if k in table and table[k].scope != "call"}
        cfg = {**cfg, **kept, **given, "out": folder}
        diff = cli.config_diff(table, saved, cfg)
        if diff:
            was = ", ".join(f"{cli.flag(k)} {saved.get(k, table[k].default)} (now {cfg[k]})"
                            for k in diff)
            raise cli.SAUError(f"{folder} was made with another config: {was}; resume with the "
                               f"same flags or start a new --out")
        return cfg
    return settings


def write_metrics(out, metrics):
    cli.write_atomic(os.path.join(out, "metrics.jsonl"),
                     "".join(json.dumps(r) + "\n" for r in metrics))


def start_line(out, cfg, run, start):
    mixed, epochs = run.mixed, cfg["epochs"]
    where = f"{run.device}{' bf16' if run.amp else ''}, loader {run.loader}"
    where += f" x {run.world} processes" if run.world > 1 else ""
    todo = (f"epochs {start + 1}-{epochs}" if start < epochs
            else f"all {start} epochs done: its files are rebuilt from the checkpoint")
    line = (f"{out}: {len(mixed)} training images ({sum(mixed.n_real)} real, "
            f"{sum(mixed.n_syn)} synthetic), {len(mixed.classes)} classes, {where}, {todo}")
    if cfg["resume"]:
        kept = " ".join(f"{cli.flag(k)} {cfg[k]}" for k, s in RUNTIME_CONFIG.items()
                        if s.scope == "runtime" and cfg[k] != s.default) or "the defaults"
        line += f"; resumed, runtime settings (the run's unless given now): {kept}"
    return line


# ---------------------------------------------------------------- --bench


def timed(batches, work, n, warmup, device, begin=lambda: None):
    """(seconds a batch over n batches, seconds of the warmup ones before: compilation)."""
    it, t0 = iter(batches), time.perf_counter()
    for i in range(warmup + n):
        if i == warmup:
            cli.synchronize(device)
            begin()
            t = time.perf_counter()
        work(next(it))
    cli.synchronize(device)
    return (time.perf_counter() - t) / n, t - t0


def bench(cfg, run, method, warmup=3):
    """--bench: the whole step, its data path alone and the forward-only passes (prototypes, test
    set) timed with the run's flags, peak memory and, on CUDA, the timed steps' host syncs; the
    figures printed and returned, nothing written. method: train.py, the module."""
    mix = method.mix_draws(np.random.default_rng(0), 1, cfg["mix_alpha"])[0].to(run.device)
    num_classes, dim = len(run.mixed.classes), run.model.proj[-1].out_features
    protos = F.normalize(torch.randn(num_classes, 2, dim, device=run.device), dim=-1)
    counts = torch.zeros(len(run.mixed), dtype=torch.int32, device=run.device)
    warmup += 7 * (cfg["compile"] == "on")  # compilation, and a recompilation for the eval graph
    # as many steps as asked for, over epochs
    pairs = lambda: (ab for e in itertools.count() for ab in method.streams(run, cfg, e))
    inputs = lambda ab: method.step_inputs(run, cfg, *ab, mix, protos)
    step = lambda ab: method.train_step(run, inputs(ab), counts)
    # a prototype batch: two views of real images through backbone and projection head
    real = np.flatnonzero(~run.mixed.is_syn).tolist()
    real *= 1 + (warmup + cfg["bench"]) * 256 // max(len(real), 1)
    forward = (run.batches(("v2", "v3"), 256, 0, real, stream="bench"),
               lambda b: method.project_views(run, b))
    n, device, cuda = cfg["bench"], run.device, run.device.type == "cuda"
    # CUDA: every host sync inside a timed step warns once (not the warm-up's copies and
    # compilation)
    with warnings.catch_warnings(record=True) as syncs:
        warnings.simplefilter("always")
        try:
            step_s, warmup_s = timed(pairs(), step, n, warmup, device,
                                     begin=lambda: cli.sync_debug(device, "warn"))
        finally:
            cli.sync_debug(device, "default")
    syncs = sum("synchroniz" in str(w.message) for w in syncs) if cuda else None
    data_s = timed(pairs(), inputs, n, warmup, device)[0]
    run.model.eval()
    with torch.no_grad():
        proto_s = timed(*forward, n, warmup, device)[0]
    bs, steps = cfg["batch_size"] // run.world, math.ceil(len(run.mixed) / cfg["batch_size"])
    # per epoch: the steps, the prototypes (real images, two views, batches of 256) and the test
    # set (one view, about half the cost)
    passes = math.ceil(sum(run.mixed.n_real) / 256) * (cfg["w_con"] > 0) + len(run.test[1]) / 512
    epoch_s = steps * step_s + passes * proto_s
    name, peak = cli.device_figures(device)
    res = {"device": name, "loader": run.loader, "amp": "bf16" if run.amp else "off",
           "width": cfg["width"], "batch_size": bs, "channels_last": cfg["channels_last"],
           "compile": cfg["compile"], "steps_timed": n, "step_images_per_s": bs / step_s,
           "data_images_per_s": bs / data_s, "data_fraction": data_s / step_s,
           "forward_images_per_s": 2 * 256 / proto_s, "epoch_s": epoch_s,
           "run_s": epoch_s * cfg["epochs"], "peak": peak, "host_syncs_in_timed_steps": syncs,
           "warmup_s": warmup_s}
    print(f"bench ({name}; loader {run.loader}, amp {res['amp']}, channels_last "
          f"{cfg['channels_last']}, compile {cfg['compile']}, width {cfg['width']}, batch {bs}; "
          f"{n} steps after {warmup} warm-up, {warmup_s:.1f} s with any compilation):\n"
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
