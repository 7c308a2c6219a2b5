"""What every script shares at the command line: the settings table, one-line errors, atomic
writes, the run folder's lock and the device. It imports none of the scripts."""
import argparse
import contextlib
import errno
import fcntl
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
from typing import NamedTuple

import numpy as np
import torch


class SAUError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 (run_cli), as every other refusal
        raise SAUError(message)


# ---------------------------------------------------------------- settings: one entry per flag


class Setting(NamedTuple):
    """One flag. check: (predicate, what a value must be); named: in the run name "always", if
    not the default ("changed") or "never", as tag + value (tag None: the key); scope: "run" shapes
    the results, "runtime" only their speed or rounding, "call" belongs to one command."""
    default: object
    help: str
    check: tuple = None
    choices: tuple = None
    tag: str = None
    named: str = "changed"
    scope: str = "run"
    type: type = None  # the default's, unless the default is None
    nargs: str = None


POSITIVE, NON_NEGATIVE = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0")
AT_LEAST_1, FRACTION = (lambda v: v >= 1, ">= 1"), (lambda v: 0 <= v <= 1, "in [0, 1]")
DEVICE = Setting("auto", "auto (cuda if present) | cpu | cuda | cuda:N",
                 (lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v), "auto, cpu, cuda or cuda:N"),
                 scope="runtime")
# seeds derived from a seed (seed x 10^6 x 6 x 10^6 + i) stay in int64
SEED = (lambda v: 0 <= v < 2**20, "in [0, 2^20)")


def flag(key):  # batch_size -> --batch-size
    return "--" + key.replace("_", "-")


def parse_settings(table, ignored, description, argv=None, resumed=None, **kw):
    """The settings of one command as a dict, checked. A flag not given is left out of the parse
    (argparse.SUPPRESS), so the parse says which were given: resumed(cfg, given) fills the others
    of a run continued, and a flag of `ignored` [(key, when(cfg), "with --flag value")] given
    where it has no effect is refused."""
    p = Parser(description=description, argument_default=argparse.SUPPRESS, **kw)
    for key, s in table.items():
        if s.default is False:
            p.add_argument(flag(key), action="store_true", help=s.help)
            continue
        shown = f"{s.help} (default: {s.default})" if s.default not in (None, "") else s.help
        p.add_argument(flag(key), type=s.type or type(s.default), choices=s.choices, help=shown,
                       metavar=None if s.choices else key.upper(), nargs=s.nargs)
    given = vars(p.parse_args(argv))
    cfg = {**{k: s.default for k, s in table.items()}, **given}
    cfg = resumed(cfg, given) if resumed else cfg
    check_settings(cfg, table)
    for key, when, because in ignored:
        if key in given and cfg[key] != table[key].default and when(cfg):
            raise SAUError(f"{flag(key)} {cfg[key]} has no effect {because}: leave it out")
    return cfg


def run_name(table, cfg, seed=True):
    """The settings that shape the results, where they differ from the defaults, then the seed."""
    value = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    named = lambda k, s: s.named == "always" or s.named == "changed" and cfg[k] != s.default
    parts = [(k if s.tag is None else s.tag) + value(cfg[k]) for k, s in table.items()
             if s.scope == "run" and named(k, s)]
    return "_".join(parts + ([f"s{cfg['seed']}"] if seed else []))


def config_diff(a, b, table=None, ignore=()):
    """The keys of two sets of settings whose values differ. With a settings table: those that
    shape the results, in its order, a key missing on one side taking its default (a run made
    before a setting existed had it)."""
    if table:
        defaults = {k: s.default for k, s in table.items() if s.scope == "run"}
        a, b, keys = {**defaults, **a}, {**defaults, **b}, list(defaults)
    else:
        keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in ignore and a.get(k) != b.get(k)]


def check_settings(cfg, table):
    for key, s in table.items():
        v = cfg.get(key)
        if isinstance(v, float) and not math.isfinite(v):
            raise SAUError(f"{flag(key)} must be a finite number, got {v}")
        if v is not None and s.check and not s.check[0](v):
            raise SAUError(f"{flag(key)} must be {s.check[1]}, got {v}")
    return cfg


def read_json(path):
    try:
        return json.loads(open(path).read())
    except (OSError, ValueError) as e:
        raise SAUError(f"{path} is unreadable or not JSON ({e.__class__.__name__}): restore or "
                       f"delete it") from None


def derived_seed(*parts, bits=32):
    """One seed made of several numbers (numpy's SeedSequence): a function of them alone."""
    dtype = np.uint64 if bits == 63 else np.uint32
    state = int(np.random.SeedSequence(list(parts)).generate_state(1, dtype)[0])
    return state >> 1 if bits == 63 else state


def one_process(instead):
    """Refuse torchrun's several processes (WORLD_SIZE > 1): a script is one process a GPU."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise SAUError(f"started as one of {os.environ['WORLD_SIZE']} processes (torchrun?): "
                       f"{instead}")


# ------------------------------------------------- the device: every torch.cuda call of the scripts


def use_device(name, deterministic=False):
    """--device -> torch.device, made the process's current GPU (not GPU 0 for pinned memory and
    cuDNN). Convolutions in TF32, every fp32 matmul (losses, prototypes) in full fp32."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SAUError(f"--device {name}: CUDA is not available here; use --device cpu")
    device, seen = torch.device(name), torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= seen:
        raise SAUError(f"--device {name}: this machine has {seen} CUDA device(s)")
    if device.type == "cuda":
        torch.cuda.set_device(torch.cuda.current_device() if device.index is None else device.index)
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    if deterministic:  # the workspace is read when cuBLAS starts: before any matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # an op with no deterministic kernel warns rather than fails
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_figures(device):
    """(name, peak memory): the GPU's, else the CPU's threads and the process's resident peak."""
    if torch.device(device).type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        return torch.cuda.get_device_name(device), f"{peak:.2f} GiB on the GPU"
    import resource
    return (f"cpu, {torch.get_num_threads()} threads",
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (host)")


def cpu_has_bf16():  # AVX512-BF16 or AMX: elsewhere bf16 autocast on a CPU is emulated, slower
    flags = open("/proc/cpuinfo").read() if os.path.isfile("/proc/cpuinfo") else ""
    return " avx512_bf16" in flags or " amx_bf16" in flags


# ---------------------------------------------------------------- files, the lock, the exit


def run_cli(main):
    """main() with bad input as one line and exit 2, Ctrl-C as one line and exit 130."""
    prog = os.path.basename(sys.argv[0])
    try:
        main()
    except SAUError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        how = e.args[0] if e.args else "what was written is complete (renamed into place)"
        print(f"\n{prog}: interrupted; {how}", file=sys.stderr)
        sys.exit(130)


def ignore_sigint(*_):
    """A grid's run leaves Ctrl-C to the runner, that stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def write_atomic(path, text_or_save):
    """Write to a temporary name of this process, then rename: a kill or a full disk never leaves
    a half-written file, and a failed write keeps the old one. A folder (save writes one) replaces
    the old one in two renames: a kill between them leaves path.old (restored puts it back)."""
    tmp, old = f"{path}.{os.getpid()}.tmp", f"{path}.old"
    try:
        if isinstance(text_or_save, str):
            with open(tmp, "w") as f:
                f.write(text_or_save)
        else:
            text_or_save(tmp)
        if os.path.isdir(tmp):  # a folder: the old one moved aside, then replaced
            if os.path.isdir(path):
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:80]
        raise SAUError(f"could not write {path} ({why}); the previous version, if any, is kept: "
                       f"free space or fix the folder, then run the same command again") from None


def restored(folder):
    """A folder as write_atomic left it, also when killed: the old one back if the new one was not
    in place yet, half-written ones removed."""
    for tmp in glob.glob(glob.escape(folder) + ".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isdir(folder) and os.path.isdir(folder + ".old"):
        os.replace(folder + ".old", folder)
    return folder


def writable_folder(path, flag):
    """Make the folder, or say in one line why it cannot be."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SAUError(f"{flag} {path} is a file, not a folder: pass a folder")
    probe = os.path.join(path, f".probe.{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise SAUError(f"{flag} {path} is not writable ({e.strerror}): pass another") from None
    return path


@contextlib.contextmanager
def one_at_a_time(path):  # hold the lock file at path, waiting while another process holds it
    with open(path, "a") as f:
        lock(f, path, wait=True)
        yield


def lock(f, path, wait=False):
    """flock the open file f at path: False where another process holds it (wait: until it lets
    go). A file system that cannot lock (some NFS and Lustre mounts) is one line."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):  # held by another process
            return False
        raise SAUError(f"{path}: its file system cannot lock files ({e.strerror}; some NFS and "
                       f"Lustre mounts): put it on one that can (a local disk, Lustre mounted "
                       f"with -o flock)") from None


def own(out, flag="--out", what="run"):
    """Hold out/lock while this process lives: a second run on the folder is refused. The kernel
    drops the lock when the process ends, however it ends; the pid it wrote names it."""
    f = open(os.path.join(writable_folder(out, flag), "lock"), "a+")
    f.seek(0)
    holder = f.read().strip()
    if not lock(f, f.name):
        raise SAUError(f"{out} is in use by another {what} ({holder or 'starting'}): wait for it "
                       f"to end, or pass another {flag}")
    if holder:
        print(f"{out}: the {what} that held it ({holder}) ended without releasing it (killed?); "
              f"taking it over")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    for tmp in glob.glob(os.path.join(out, "*.tmp")):  # half-written files of a killed run
        os.remove(tmp)
    return f
