"""How train.py's runs are run, around the method: the runtime settings, the set-up and the run
folder. checkpoint.pt is the folder's state, replaced in one rename per epoch; the other files
are rebuilt from it by --resume, so a run killed at any instant resumes."""
import dataclasses
import json
import os

import numpy as np
import torch

import cli
import data
import report
import views
from model import resnet32

S, ON_OFF = cli.Setting, ("on", "off")
# how a run is computed: named in the run (amp), "runtime" (speed or rounding only: kept on
# --resume unless given) or "call" (one command's)
RUNTIME_CONFIG = {
    "amp": S("auto", "bf16 autocast: auto (on CUDA, and on a CPU with native bf16) | bf16 | off",
             choices=("auto", "bf16", "off")),
    "device": cli.DEVICE,
    "channels_last": S("on", "channels_last memory format (ours)", choices=ON_OFF, scope="runtime"),
    "compile": S("off", "torch.compile the training step, views included (ours)", choices=ON_OFF,
                 scope="runtime"),
    "deterministic": S("off", "deterministic CUDA kernels: a CUDA run resumes bit for bit; slower "
                       "(ours)", choices=ON_OFF, scope="runtime"),
    "bench": S(0, "time this many steps after warm-up, print the figures and exit (ours)",
               cli.NON_NEGATIVE, scope="call"),
    "out": S("", "run folder; empty: runs/<the settings not at their defaults>", scope="call"),
    "resume": S("", "continue the run in this folder; flags not given are the run's", scope="call"),
    "summarize": S(None, "mean and std of finished runs' final metrics over seeds, into --out or "
                   "runs/summary_<name>.md/.json", scope="call", type=str, nargs="+"),
    "stop_after": S(0, "leave after this many epochs in all, checkpoint kept (time limits; ours)",
                    cli.NON_NEGATIVE, scope="call"),
}


# ---------------------------------------------------------------- set-up


@dataclasses.dataclass
class Run:
    """What a run holds from set-up to its end: one process, one device."""
    device: torch.device
    amp: bool  # bf16 autocast on
    fmt: torch.memory_format  # the network's
    mixed: data.MixedSet
    batches: data.Batches  # (views, batch size, seed, order) -> views.Batch, on the device
    real: torch.Tensor  # the real images' positions in the mixed set (the prototypes')
    test: tuple  # (uint8 [10000, 3, 32, 32], labels [10000]) on the host
    model: torch.nn.Module  # the ResNet-32
    opt: torch.optim.Optimizer = None  # these three: train.setup's
    sched: torch.optim.lr_scheduler.LRScheduler = None
    step_fn: torch.nn.Module = None  # train.Step (compiled with --compile on)

    def prep(self, x):  # on the device, in the network's memory format
        return x.to(self.device, non_blocking=True).contiguous(memory_format=self.fmt)

    def plain(self, images, batch_size=1000):
        """(start, x): uint8 [N, 3, 32, 32] images in batches, normalised, on the device."""
        mean, std = views.mean_std(self.mixed.dataset, self.device)
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(self.device)
            yield i, self.prep(views.normalize(x, mean, std))


def setup(cfg):
    """The run's device, data and network; train.setup adds the optimiser and the step."""
    device = cli.use_device(cfg["device"], cfg["deterministic"] == "on")
    # training's shapes are fixed: cuDNN may time its kernels and keep the fastest, which adds in a
    # varying order (not --deterministic on; not generate.py, whose pools keep their bytes)
    torch.backends.cudnn.benchmark = device.type == "cuda" and cfg["deterministic"] == "off"
    amp = cfg["amp"] == "bf16" or (cfg["amp"] == "auto" and (device.type == "cuda"
                                                             or cli.cpu_has_bf16()))
    mixed = data.build_mixed(**{k: cfg[k] for k in data.DATA_CONFIG})
    x_test, y_test = data.load_cifar(cfg["dataset"], cfg["data_root"], train=False)
    fmt = torch.channels_last if cfg["channels_last"] == "on" else torch.contiguous_format
    torch.manual_seed(cfg["seed"])
    model = resnet32(len(mixed.classes), cfg["width"]).to(device, memory_format=fmt)
    return Run(device=device, amp=amp, fmt=fmt, mixed=mixed, batches=data.Batches(mixed, device),
               real=torch.from_numpy(np.flatnonzero(~mixed.is_syn)).to(device),
               test=(torch.from_numpy(x_test).permute(0, 3, 1, 2), torch.from_numpy(y_test)),
               model=model)


def compiled(step):
    """torch.compile(step), saying so in one line before each of its compilations (the first
    step's, a short last batch's, a resumed run's): minutes with no output read as a hang."""
    handler = torch._dynamo.callback.callback_handler
    if say_compiling not in handler.start_callbacks:
        handler.register_start_callback(say_compiling)
    return torch.compile(step)


def say_compiling(args):
    if args.callback_trigger == torch._dynamo.callback.CallbackTrigger.DYNAMO:
        print(f"torch.compile: compiling the training step (graph {args.compile_id}): minutes with "
              f"no output on a cold cache, seconds on a warm one", flush=True)


# ---------------------------------------------------------------- the run folder


class Folder:
    """The run's folder, locked from `with` to the end: a run there is refused without --resume."""

    def __init__(self, cfg, name):
        self.cfg, self.out = cfg, cfg["out"] or os.path.join("runs", name)
        self.metrics, self.ev, self.ckpt, self.done = [], None, None, 0

    def __enter__(self):
        self.lock = cli.own(self.out)
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
        if self.lock:  # an empty lock file: the run ended (a killed one leaves its pid)
            self.lock.truncate(0)
            self.lock.close()
            self.lock = None
        if kind and issubclass(kind, KeyboardInterrupt):
            raise KeyboardInterrupt(f"the last finished epoch is kept: continue with python "
                                    f"train.py --resume {self.out}") from None

    def restore(self, run):
        """The first epoch to train, the checkpoint restored; config.json, metrics.jsonl, a line."""
        if self.ckpt:
            run.model.load_state_dict(self.ckpt["model"])
            run.opt.load_state_dict(self.ckpt["optimizer"])
            run.sched.load_state_dict(self.ckpt["scheduler"])
            self.done, self.metrics, self.ev = (self.ckpt[k] for k in ("epoch", "metrics", "eval"))
        config = {k: v for k, v in self.cfg.items() if k != "resume"}
        cli.write_atomic(os.path.join(self.out, "config.json"), json.dumps(config, indent=1))
        write_metrics(self.out, self.metrics)
        print(start_line(self.out, self.cfg, run, self.done), flush=True)
        return self.done

    def epochs(self):  # the end of this command's epochs: --stop-after ends early
        return min(self.cfg["epochs"], self.cfg["stop_after"] or self.cfg["epochs"])

    def epoch_done(self, run, metrics, ev, suspects):  # the line, checkpoint.pt, metrics.jsonl
        mixed, self.done = run.mixed, metrics["epoch"]
        self.ev = {**ev, "n_real": mixed.n_real, "n_syn": mixed.n_syn, "classes": mixed.classes}
        self.metrics.append(metrics)
        report.print_epoch(metrics, self.cfg["epochs"])
        state = {"model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
                 "scheduler": run.sched.state_dict(), "epoch": self.done,
                 "config": self.cfg, "metrics": self.metrics, "eval": self.ev, **suspects}
        cli.write_atomic(os.path.join(self.out, "checkpoint.pt"), lambda p: torch.save(state, p))
        write_metrics(self.out, self.metrics)

    def finish(self, run, flagged, scores):  # final.json and the pictures, also when resumed done
        if self.done < self.cfg["epochs"]:
            print(f"stopping after epoch {self.done} (--stop-after); continue with --resume "
                  f"{self.out}")
        else:
            report.write_final(self.out, self.cfg, self.metrics, self.ev, run.mixed, flagged,
                               scores)

    def check_finite(self, run, bad_step, epoch, weights=False):
        """Stop at a non-finite loss (bad_step: its first step, or -1) or weights: what is saved
        is always finite."""
        bad_weights = torch.zeros((), device=bad_step.device)
        if weights:
            finite = [t.isfinite().all() for t in run.model.state_dict().values()
                      if t.is_floating_point()]
            bad_weights = (~torch.stack(finite).all()).float()
        worst = torch.stack([bad_step.float(), bad_weights]).tolist()
        if worst[0] < 0 and not worst[1]:
            return
        what = (f"loss at epoch {epoch + 1}, step {int(worst[0])}" if worst[0] >= 0
                else f"weights after epoch {epoch + 1}")
        raise cli.SAUError(f"non-finite {what}: stopped; the last good checkpoint "
                           f"({f'epoch {epoch}' if epoch else 'none yet'}) is kept in "
                           f"{self.out}; try a lower --lr")


def load_checkpoint(out, mmap=False):
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, bad pickle: the same message
        raise cli.SAUError(f"checkpoint {path} is unreadable ({e.__class__.__name__}): delete it "
                           f"and start again") from None


def resumed(table):
    """parse_settings' hook: flags not given are the resumed run's; one that differs is refused."""
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
        loader = saved.get("loader", "gpu")  # retired: the cpu loader was torchvision's views
        if ckpt and loader != "gpu":
            on = " (auto: cpu on a CPU)" if loader == "auto" else ""
            print(f"{folder}: made with --loader {loader}{on}, now retired: from epoch "
                  f"{ckpt['epoch'] + 1} its views are drawn on the device, the same "
                  f"distributions from other random numbers")
        kept = {k: v for k, v in saved.items() if k in table and table[k].scope != "call"}
        cfg = {**cfg, **kept, **given, "out": folder}
        diff = cli.config_diff(saved, cfg, table)
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
    where = f"{run.device}{' bf16' if run.amp else ''}"
    todo = (f"epochs {start + 1}-{epochs}" if start < epochs
            else f"all {start} epochs done: its files are rebuilt from the checkpoint")
    line = (f"{out}: {len(mixed)} training images ({sum(mixed.n_real)} real, "
            f"{sum(mixed.n_syn)} synthetic), {len(mixed.classes)} classes, {where}, {todo}")
    if cfg["resume"]:
        kept = " ".join(f"{cli.flag(k)} {cfg[k]}" for k, s in RUNTIME_CONFIG.items()
                        if s.scope == "runtime" and cfg[k] != s.default) or "the defaults"
        line += f"; resumed, runtime settings (the run's unless given now): {kept}"
    return line
