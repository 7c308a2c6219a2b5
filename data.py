"""CIFAR, the long-tailed subset, the synthetic pool, the mixed set, the batch streams; the settings framework, the
device and the command-line conventions every script shares.

    python data.py --dataset cifar10 --imb 100      # per-class real/synthetic counts
"""
import argparse
import fcntl
import glob
import json
import math
import os
import pickle
import re
import signal
import socket
import sys
import zipfile
from typing import NamedTuple

import numpy as np
import torch

import views

DATASETS = {  # name: (folder, train files, test file, label key, names key, meta file, torchvision class)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "labels", "label_names", "batches.meta", "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", "fine_label_names", "meta", "CIFAR100"),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
SYN_MODES = ("pool", "none", "heldout")
SHARD_RE = re.compile(r"^c(\d{3})_(\d{6})\.npz$")
# Each stream of random draws in an epoch has its own seed, epoch_seed * len(STREAMS) + its index: no stream of one
# epoch repeats another stream's draws of this epoch or of any other.
STREAMS = ("order_a", "order_b", "views_a", "views_b", "prototypes", "mix")


def stream_seed(epoch_seed, stream):
    return epoch_seed * len(STREAMS) + STREAMS.index(stream)


class SAUError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2, like ours."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------- settings: one entry per flag, for every script


class Setting(NamedTuple):
    """One flag. check: (predicate, what a value must be); named: in the run name "always", when it differs from
    the default ("changed"), or "never", as tag + value (tag None: the key); scope: "run" shapes the results
    (compared on --resume and --summarize), "runtime" only their speed or rounding (kept on --resume unless
    given), "call" belongs to one command (--out, --resume, --stop-after, --bench)."""
    default: object
    help: str
    check: tuple = None
    choices: tuple = None
    tag: str = None
    named: str = "changed"
    scope: str = "run"
    type: type = None  # the default's, unless the default is None
    nargs: str = None  # "+": a list of values (--summarize RUN ...)


POSITIVE, NON_NEGATIVE, AT_LEAST_1 = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1, ">= 1")
FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
DEVICE = Setting("auto", "auto (cuda if present) | cpu | cuda | cuda:N", (
    lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v), "auto, cpu, cuda or cuda:N"), scope="runtime")
SEED = (lambda v: 0 <= v < 2**20, "in [0, 2^20)")  # seeds derived from it (seed x 10^6 x 6 x 10^6 + i) stay in int64
DATA_CONFIG = {  # the flags of every script that builds the mixed set (data.py, train.py; generate.py some)
    "dataset": Setting("cifar10", "cifar10 | cifar100", choices=tuple(DATASETS), tag="", named="always"),
    "imb": Setting(100.0, "imbalance factor: head / tail real images", AT_LEAST_1, named="always"),
    "syn": Setting("pool", "tail fill: pool (generate.py's images) | none (plain long-tailed set) | heldout (unused "
                   "real images, ours)", choices=SYN_MODES, tag="", named="always"),
    "syn_ratio": Setting(1.0, "fraction of each class's synthetic fill that is used", NON_NEGATIVE, tag="r"),
    "syn_noise": Setting(0.0, "fraction of each class's fill drawn from the other classes' fill source, keeping its "
                         "label: planted wrong-class images that measure the relabel rule (ours)", FRACTION,
                         tag="noise"),
    "pool": Setting("", "synthetic pool folder; empty: <data-root>/synthetic/<dataset>", named="never"),
    "data_root": Setting("./data", "folder holding the CIFAR python-layout files", scope="runtime"),
    "data_seed": Setting(0, "seed of the long-tailed subset and the synthetic draw", SEED, tag="ds"),
}


def settings_parser(table, description, defaults=True, **kw):
    """argparse from a settings table; defaults=False leaves out flags not given (to tell what was given)."""
    p = Parser(description=description, argument_default=None if defaults else argparse.SUPPRESS, **kw)
    for key, s in table.items():
        extra = dict(default=s.default) if defaults else {}
        if s.default is False:
            p.add_argument("--" + key.replace("_", "-"), action="store_true", help=s.help, **extra)
        else:
            p.add_argument("--" + key.replace("_", "-"), type=s.type or type(s.default), choices=s.choices,
                           help=f"{s.help} (default: {s.default})" if s.default not in (None, "") else s.help,
                           metavar=None if s.choices else key.upper(), nargs=s.nargs, **extra)
    return p


def parse_settings(table, ignored, description, argv=None, resumed=None, **kw):
    """The settings of one command as a dict: parsed, checked, and refused where one cannot act under another.
    ignored: [(key, when(cfg), "with --flag value")], a setting given with a value other than its default where it
    has no effect is refused rather than silently named. resumed(cfg, given): the settings of a run continued."""
    cfg = vars(settings_parser(table, description, True, **kw).parse_args(argv))
    given = vars(settings_parser(table, description, False, **kw).parse_args(argv))
    cfg = resumed(cfg, given) if resumed else cfg
    check_settings(cfg, table)
    for key, when, because in ignored:
        if key in given and cfg[key] != table[key].default and when(cfg):
            raise SAUError(f"--{key.replace('_', '-')} {cfg[key]} has no effect {because}: leave it out")
    return cfg


def run_name(table, cfg, seed=True):
    """The settings that shape the results, where they differ from the defaults, then the seed."""
    value = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    parts = [(k if s.tag is None else s.tag) + value(cfg[k]) for k, s in table.items() if s.scope == "run" and (
        s.named == "always" or s.named == "changed" and cfg[k] != s.default)]
    return "_".join(parts + ([f"s{cfg['seed']}"] if seed else []))


def config_diff(table, a, b, ignore=()):
    """The settings that shape the results and differ between two configs; a setting newer than a run had its
    default there."""
    defaults = {k: s.default for k, s in table.items()}
    a, b = {**defaults, **a}, {**defaults, **b}
    return [k for k, s in table.items() if s.scope == "run" and k not in ignore and a[k] != b[k]]


def read_json(path):
    try:
        return json.loads(open(path).read())
    except (OSError, ValueError) as e:
        raise SAUError(f"{path} is unreadable or not JSON ({e.__class__.__name__}): restore or delete it") from None


def check_settings(cfg, table):
    """One line for the first value that is not finite or fails its setting's check."""
    for key, s in table.items():
        v = cfg.get(key)
        if isinstance(v, float) and not math.isfinite(v):
            raise SAUError(f"--{key.replace('_', '-')} must be a finite number, got {v}")
        if v is not None and s.check and not s.check[0](v):
            raise SAUError(f"--{key.replace('_', '-')} must be {s.check[1]}, got {v}")
    return cfg


# ---------------------------------------------------------------- the device: every torch.cuda call of the scripts


def pick_device(name):
    """--device auto|cpu|cuda|cuda:N -> torch.device; CUDA asked for where there is none is bad input. Under torchrun
    (WORLD_SIZE > 1) each process takes GPU LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SAUError(f"--device {name}: CUDA is not available here; use --device cpu")
    device = torch.device(name)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SAUError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def use_device(name, deterministic=False):
    """pick_device, then make it the process's current GPU (pinned memory, cuDNN handles and stray allocations go
    there, not to GPU 0). Precision on CUDA: convolutions in TF32, every fp32 matmul in full fp32 (the losses, the
    prototype products, the views' affine grids). deterministic: cuDNN and cuBLAS pick deterministic kernels."""
    device = pick_device(name)
    if device.type == "cuda":
        torch.cuda.set_device(torch.cuda.current_device() if device.index is None else device.index)
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = "tf32", "ieee"
    if deterministic:  # an op that has no deterministic kernel warns
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any matmul
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def sync_debug(device, mode):
    """CUDA's host-sync debug mode ("warn", "error" or "default"); nothing on a CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_sync_debug_mode(mode)


def device_figures(device):
    """(name, peak memory) for a report: the GPU's, else the CPU's threads and the process's resident peak."""
    if torch.device(device).type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        return torch.cuda.get_device_name(device), f"{peak:.2f} GiB on the GPU"
    import resource
    return (f"cpu, {torch.get_num_threads()} threads",
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (host)")


def cpu_has_bf16():
    """Native bf16 arithmetic (AVX512-BF16 or AMX): without it bf16 autocast on a CPU is emulated and slower."""
    flags = open("/proc/cpuinfo").read() if os.path.isfile("/proc/cpuinfo") else ""
    return " avx512_bf16" in flags or " amx_bf16" in flags


def own(out):
    """Hold out/lock while this process lives: a second run on the folder is refused. The kernel drops the lock when
    the process ends, however it ends, so a killed run blocks nothing; the pid it wrote names it."""
    f = open(os.path.join(writable_folder(out, "--out"), "lock"), "a+")
    f.seek(0)
    holder = f.read().strip()
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SAUError(f"{out} is in use by another run ({holder or 'starting'}): wait for it to end, or pass "
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


_SIGINT, _FORKING, _PID = [], [], os.getpid()  # a Ctrl-C arrived; a fork is under way; the main process
os.register_at_fork(before=lambda: _FORKING.append(1), after_in_parent=_FORKING.clear)


def _on_sigint(*_):
    """run_cli's Ctrl-C: noted, and raised as KeyboardInterrupt, except in a forked DataLoader worker that has not
    yet set itself to ignore it (the main process stops it) and during a fork, where the exception would be lost in
    the fork's hooks: check_interrupt raises it at the next step."""
    if os.getpid() != _PID:
        return
    _SIGINT.append(1)
    if not _FORKING:
        raise KeyboardInterrupt


def interrupted():
    return bool(_SIGINT)


def check_interrupt():
    if _SIGINT:
        raise KeyboardInterrupt


def run_cli(main):
    """main() with bad input as one line and exit 2, Ctrl-C as one line and exit 130. A KeyboardInterrupt's message
    says how to go on. A Ctrl-C can also surface as another error (a DataLoader worker that it stopped first): that
    is an interrupt too."""
    prog = os.path.basename(sys.argv[0])
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (a background job)
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        main()
    except SAUError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        _say_interrupted(prog, e)
    except Exception as e:
        if not _SIGINT:
            raise
        _say_interrupted(prog, e)


def _say_interrupted(prog, e):
    how = e.args[0] if isinstance(e, KeyboardInterrupt) and e.args else "what was written is complete (each file " \
        "is renamed into place)"
    print(f"\n{prog}: interrupted; {how}", file=sys.stderr)
    sys.unraisablehook = lambda _: None  # a DataLoader iterator the Ctrl-C cut off in its set-up fails in __del__
    sys.exit(130)


def write_atomic(path, text_or_save):
    """Write to a temporary name of this process, then rename: a kill never leaves a half-written file, two processes
    never share a temporary file, a failed write (a full disk) leaves the old file and no temporary one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        if isinstance(text_or_save, str):
            with open(tmp, "w") as f:
                f.write(text_or_save)
        else:
            text_or_save(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:80]
        raise SAUError(f"could not write {path} ({why}); the previous version, if any, is kept: "
                       f"free space or fix the folder, then run the same command again") from None


def writable_folder(path, flag):
    """Make the folder, or say in one line why it cannot be."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SAUError(f"{flag} {path} is a file, not a folder: pass a folder")
    try:
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, f".probe.{os.getpid()}"), "w").close()
        os.remove(os.path.join(path, f".probe.{os.getpid()}"))
    except OSError as e:
        raise SAUError(f"{flag} {path} is not writable ({e.strerror}): pass another folder") from None
    return path


# ---------------------------------------------------------------- CIFAR


def _unpickle(path):
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
    except Exception as e:  # missing, truncated, not a pickle, a pickle of a class we do not have
        raise SAUError(f"cannot read {path} ({e.__class__.__name__}): delete the folder and fetch CIFAR "
                       f"again") from None
    if not isinstance(d, dict):
        raise SAUError(f"{path} holds a {type(d).__name__}, not CIFAR's dict: delete the folder and fetch CIFAR again")
    return d


def _ensure_cifar(dataset, root):
    """The dataset's folder under root, downloaded by torchvision if missing."""
    folder = os.path.join(root, DATASETS[dataset][0])
    if os.path.isdir(folder):
        return folder
    import torchvision.datasets
    source = getattr(torchvision.datasets, DATASETS[dataset][6])
    try:
        source(root, train=True, download=True)
    except Exception as e:  # any network or archive failure ends the same way
        raise SAUError(f"{dataset} not found at {folder} and the download failed ({e.__class__.__name__}); "
                       f"fetch {source.url} (the CIFAR python version) where there is a network and unpack it "
                       f"into --data-root: tar xzf {source.filename} -C {root} makes {folder}") from None
    return folder


def class_names(dataset, root):
    folder = _ensure_cifar(dataset, root)
    _, _, _, _, names_key, meta, _ = DATASETS[dataset]
    path = os.path.join(folder, meta)
    names = _unpickle(path).get(names_key)
    if not isinstance(names, list) or len(names) != NUM_CLASSES[dataset] or not all(isinstance(n, str) for n in names):
        raise SAUError(f"{path} has no list of {NUM_CLASSES[dataset]} class names under {names_key!r}: delete "
                       f"{folder} and fetch CIFAR again")
    return names


def load_cifar(dataset, root, train):
    """(images uint8 [N, 32, 32, 3] RGB HWC, labels int64 [N]) of the train or test split."""
    folder = _ensure_cifar(dataset, root)
    _, train_files, test_file, label_key, _, _, _ = DATASETS[dataset]
    xs, ys = [], []
    for name in (train_files if train else [test_file]):
        path = os.path.join(folder, name)
        d = _unpickle(path)
        try:
            x, y = np.asarray(d["data"]), np.asarray(d[label_key])
            ok = x.ndim == 2 and x.shape[1] == 3072 and y.shape == (len(x),) and np.issubdtype(y.dtype, np.integer)
            ok = ok and np.issubdtype(x.dtype, np.integer) and x.min(initial=0) >= 0 and x.max(initial=0) <= 255
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or not len(y) or y.min() < 0 or y.max() >= NUM_CLASSES[dataset]:
            raise SAUError(f"{path} is not a CIFAR batch (expected 'data' [n, 3072] in 0-255 and {label_key!r} [n] "
                           f"in 0-{NUM_CLASSES[dataset] - 1}): delete {folder} and fetch CIFAR again")
        xs.append(x.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(y.astype(np.int64))
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


# ---------------------------------------------------------------- long tail


def lt_counts(n_max, num_classes, imb):
    """Real images kept per class: n_max * (1/imb)^(c/(C-1)), class 0 the head."""
    return [int(n_max * (1 / imb) ** (c / (num_classes - 1))) for c in range(num_classes)]


def long_tail_indices(labels, imb, seed):
    """Indices of the long-tailed subset, drawn per class without replacement by the data seed."""
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1
    n_max = int(np.bincount(labels, minlength=num_classes).max())
    rng = np.random.default_rng(seed)
    keep = [np.sort(rng.choice(np.flatnonzero(labels == c), n, replace=False))
            for c, n in enumerate(lt_counts(n_max, num_classes, imb))]
    return np.concatenate(keep)


def shot_group(n_real):
    return "many" if n_real > 100 else "medium" if n_real > 20 else "few"


# ---------------------------------------------------------------- synthetic pool


def shard_name(label, start):
    return f"c{label:03d}_{start:06d}.npz"


def read_manifest(folder):
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        raise SAUError(f"no synthetic pool at {folder} (manifest.json missing): run python generate.py "
                       f"for this dataset, pass --pool DIR, or train with --syn heldout / --syn none")
    try:
        with open(path) as f:
            manifest = json.load(f)
        ok = isinstance(manifest, dict) and isinstance(manifest.get("dataset"), str) and isinstance(
            manifest.get("classes"), list) and isinstance(manifest.get("generator", {}), dict)
    except (ValueError, UnicodeDecodeError) as e:
        raise SAUError(f"{path} is malformed, not JSON ({e.__class__.__name__}): regenerate the pool") from None
    if not ok:
        raise SAUError(f"{path} is malformed (expected dataset: str, classes: [names], generator: {{settings}}): "
                       f"regenerate the pool")
    return manifest


def pool_shards(folder):
    """{label: [(start, path)]} sorted by start, for every shard file in the folder."""
    shards = {}
    for path in glob.glob(os.path.join(folder, "c*.npz")):
        m = SHARD_RE.match(os.path.basename(path))
        if m:
            shards.setdefault(int(m.group(1)), []).append((int(m.group(2)), path))
    return {c: sorted(v) for c, v in shards.items()}


def read_shard(path):
    try:
        with np.load(path, allow_pickle=False) as z:
            images, seeds = z["images"], z["seeds"]
    except Exception as e:  # zip, header and key errors all mean a damaged shard
        raise SAUError(f"pool shard {path} is unreadable ({e.__class__.__name__}): delete it and rerun generate.py")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3) or seeds.shape != (len(images),):
        raise SAUError(f"pool shard {path} holds images {images.dtype}{list(images.shape)} and seeds "
                       f"{list(seeds.shape)}, expected uint8 [n, 32, 32, 3] with n seeds: regenerate it")
    return images


def read_pool(folder, dataset, classes):
    """{label: uint8 [n, 32, 32, 3]} of a pool made for this dataset, its shards checked and joined in order."""
    manifest = read_manifest(folder)
    if manifest["dataset"] != dataset:
        raise SAUError(f"the pool at {folder} was made for {manifest['dataset']}, not {dataset}: pass --pool "
                       f"with a {dataset} pool or generate one")
    if list(manifest["classes"]) != list(classes):
        raise SAUError(f"the pool at {folder} names other classes than {dataset}'s: regenerate it")
    pool = {}
    for c, shards in pool_shards(folder).items():
        if c >= len(classes):
            raise SAUError(f"pool shard {shards[0][1]} is for class {c}, but {dataset} has {len(classes)} classes")
        parts, expected = [], 0
        for start, path in shards:
            if start != expected:
                what = "gap" if start > expected else "overlap"
                raise SAUError(f"pool for class {c} has a {what} at index {min(start, expected)} ({path}): "
                               f"rerun generate.py to fill it, or delete the overlapping shard")
            parts.append(read_shard(path))
            expected = start + len(parts[-1])
        pool[c] = np.concatenate(parts)
    return pool


# the pool as generate.py writes it: shards renamed into place, the manifest checked against the settings


def write_shard(folder, label, start, images, seeds, prompts=None, **extra):
    """One shard, written to a temporary name and renamed: never a half-written file."""
    arrays = {"images": np.asarray(images, dtype=np.uint8), "seeds": np.asarray(seeds, dtype=np.int64), **extra}
    if prompts is not None:
        arrays["prompts"] = np.asarray(prompts, dtype=str)

    def save(tmp):  # np.savez's layout with a fixed date: same images, same bytes
        with zipfile.ZipFile(tmp, "w") as z:
            for name, arr in arrays.items():
                with z.open(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as f:
                    np.lib.format.write_array(f, arr, allow_pickle=False)
    path = os.path.join(folder, shard_name(label, start))
    write_atomic(path, save)
    return path


def present(folder):
    """{label: set of indices already on disk}."""
    have = {}
    for c, shards in pool_shards(folder).items():
        for start, path in shards:
            n = len(read_shard(path))
            have.setdefault(c, set()).update(range(start, start + n))
    return have


def check_dataset(folder, dataset, names):
    """Refuse, before any loading, a folder whose pool is for another dataset."""
    if os.path.isfile(os.path.join(folder, "manifest.json")):
        old = read_manifest(folder)
        if (old["dataset"], old["classes"]) != (dataset, names):
            raise SAUError(f"{folder} holds a pool made for {old['dataset']}, not {dataset}: "
                                f"pass a new --pool folder")


def check_manifest(folder, manifest):
    """Write the manifest, or refuse a folder whose pool was made with other settings."""
    path = os.path.join(folder, "manifest.json")
    if os.path.isfile(path):
        old = read_manifest(folder)
        settings = {k: v for k, v in old.get("generator", {}).items() if k not in COUNTS}
        if settings != manifest["generator"]:
            diff = sorted(k for k in set(settings) | set(manifest["generator"])
                          if settings.get(k) != manifest["generator"].get(k))
            raise SAUError(f"{folder} holds a pool made with other generator settings ({', '.join(diff)}): "
                                f"use the same flags, or pass a new --pool folder to start another pool")
    write_atomic(path, json.dumps(manifest, indent=1))


COUNTS = ("rejected_images", "clip_refused_per_class")  # in the manifest's generator entry, but not settings


def count_rejected(folder, manifest):
    """Record in the manifest how many images were made again and, filtered, how many CLIP refused per class,
    summed over every shard on disk; return (images on disk, images made again)."""
    total = rejected = 0
    refused = {}
    for c, shards in pool_shards(folder).items():
        for _, path in shards:
            with np.load(path) as z:
                total += len(z["seeds"])
                rejected += int(z["rejected"].sum()) if "rejected" in z else 0
                if "clip_refused" in z:
                    name = manifest["classes"][c]
                    refused[name] = refused.get(name, 0) + int(z["clip_refused"].sum())
    manifest["generator"]["rejected_images"] = rejected
    if manifest["generator"].get("filter", "none") != "none":
        manifest["generator"]["clip_refused_per_class"] = {n: refused.get(n, 0) for n in manifest["classes"]}
    write_atomic(os.path.join(folder, "manifest.json"), json.dumps(manifest, indent=1))
    return total, rejected


# ---------------------------------------------------------------- the mixed set


class MixedSet:
    """The long-tailed real subset topped up per class; images uint8 [N, 32, 32, 3], labels, is_syn, and is_noisy
    (the planted wrong-class images of --syn-noise, counted as synthetic); per class n_real, n_syn, n_noisy."""

    def __init__(self, images, labels, is_syn, is_noisy, n_real, n_syn, n_noisy, classes, dataset):
        self.images, self.labels, self.is_syn, self.is_noisy = images, labels, is_syn, is_noisy
        self.n_real, self.n_syn, self.n_noisy, self.classes, self.dataset = n_real, n_syn, n_noisy, classes, dataset

    def __len__(self):
        return len(self.labels)


def build_mixed(dataset, data_root="./data", imb=100, data_seed=0, syn="pool", syn_ratio=1.0, pool=None,
                syn_noise=0.0):
    """The mixed set of DATA_CONFIG's settings (checked by check_settings)."""
    root = data_root
    classes = class_names(dataset, root)
    images, labels = load_cifar(dataset, root, train=True)
    keep = long_tail_indices(labels, imb, data_seed)
    num_classes = len(classes)
    n_real = np.bincount(labels[keep], minlength=num_classes).tolist()
    n_max = int(np.bincount(labels).max())
    n_fill = [0 if syn == "none" else int(round(syn_ratio * (n_max - n))) for n in n_real]
    n_noisy = [int(round(syn_noise * n)) for n in n_fill]
    rng = np.random.default_rng([data_seed, 1])  # the fill has its own stream: the subset never depends on it
    plant_rng = np.random.default_rng([data_seed, 2])  # and so do the planted images: P = 0 changes nothing
    xs, ys, ss, ns = [images[keep]], [labels[keep]], [np.zeros(len(keep), bool)], [np.zeros(len(keep), bool)]
    if syn == "heldout":
        left = np.setdiff1d(np.arange(len(labels)), keep)
        source = {c: images[left[labels[left] == c]] for c in range(num_classes)}
        hint = "lower --syn-ratio: heldout has only the real images the subset left out"
    elif syn == "pool":
        folder = pool or os.path.join(root, "synthetic", dataset)
        source = read_pool(folder, dataset, classes)
        hint = f"generate more (python generate.py --dataset {dataset} --imb {imb:g}) or lower --syn-ratio"
    for c, (n, k) in enumerate(zip(n_fill, n_noisy)):
        if n == 0:
            continue
        have = len(source.get(c, ()))
        if have < n - k:
            raise SAUError(f"class {c} ({classes[c]}) needs {n - k} synthetic images but the {syn} source holds "
                           f"{have}: {hint}")
        xs.append(source[c][np.sort(rng.choice(have, n - k, replace=False))])
        if k:  # planted: drawn uniformly from the other classes' sources pooled, labelled c
            others = [o for o in range(num_classes) if o != c and len(source.get(o, ()))]
            ends = np.cumsum([len(source[o]) for o in others])
            if not len(ends) or ends[-1] < k:
                raise SAUError(f"class {c} ({classes[c]}) needs {k} planted images (--syn-noise {syn_noise:g}) but the "
                               f"other classes' {syn} source holds {ends[-1] if len(ends) else 0}: lower --syn-noise")
            pick = np.sort(plant_rng.choice(int(ends[-1]), k, replace=False))
            which = np.searchsorted(ends, pick, side="right")  # the source class of each pick, and its index there
            xs.append(np.stack([source[others[w]][i - (ends[w - 1] if w else 0)] for w, i in zip(which, pick)]))
        ys.append(np.full(n, c, np.int64))
        ss.append(np.ones(n, bool))
        ns.append(np.arange(n) >= n - k)
    return MixedSet(np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), np.concatenate(ss),
                    np.concatenate(ns), n_real, n_fill, n_noisy, classes, dataset)


def _ignore_sigint(_):
    """A DataLoader worker leaves Ctrl-C to the main process, which stops them in order (else a worker the signal
    ends first is reported as a crash)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batch_maker(mixed, loader="cpu", device="cpu", workers=0):
    """(names, batch_size, seed, order) -> an iterable of (*views, labels, is_syn, index) batches of the mixed set
    in that order (names: of the views; index: of each sample in the mixed set). cpu: DataLoader workers with
    torchvision transforms, as the paper; gpu: the set held on `device` as uint8 and each batch's views made there
    (views.DeviceViews). Augmentation follows the seed alone, whatever --workers is."""
    if loader == "cpu":
        return lambda names, batch_size, seed, order: torch.utils.data.DataLoader(
            views.Views(mixed.images, mixed.labels, mixed.is_syn, mixed.dataset, names, seed), batch_size=batch_size,
            sampler=order, num_workers=workers, pin_memory=torch.device(device).type == "cuda",
            worker_init_fn=_ignore_sigint)
    if loader != "gpu":
        raise ValueError(f"unknown loader {loader!r}: cpu | gpu")
    images = torch.from_numpy(mixed.images).to(device).permute(0, 3, 1, 2).contiguous()  # N x 3 x 32 x 32 uint8
    labels, is_syn = torch.from_numpy(mixed.labels).to(device), torch.from_numpy(mixed.is_syn).to(device)
    view_fn = views.DeviceViews(mixed.dataset, images.device)

    def batches(names, batch_size, seed, order):
        g = torch.Generator(images.device).manual_seed(seed)
        order = torch.as_tensor(order, dtype=torch.long).to(images.device)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield (*view_fn(images[idx], names, g), labels[idx], is_syn[idx], idx)
    batches.images = images  # the set on the device, for plain passes over it (train.audit)
    return batches


def rank_seed(seed, rank):
    """The seed of one process's own stream of view draws: the seed itself for rank 0 (one process: as before)."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def share(order, rank=0, world=1):
    """This process's part of an epoch's order: every world-th index from rank, all parts of equal length."""
    return order[rank::world][:len(order) // world]


def train_streams(mixed, batch_size, seed, views_a=("v1", "v2", "v3"), stream_b=True, rank=0, world=1, batches=None):
    """Per step (A, B): A = (*views_a, y, is_syn, index) and B = (v1, y, is_syn, index) from two independent
    shuffles of the epoch with seed `seed`. With several processes each takes a disjoint share of both orders,
    batch_size / world images a step, and draws its views from a stream of its own. The last batch may be short;
    a batch of one cannot train BatchNorm, so a remainder of one image per process waits for the next epoch."""
    batches = batches or batch_maker(mixed)
    streams, per = [], batch_size // world
    for k, names in zip("ab", [views_a] + ([("v1",)] if stream_b else [])):
        g = torch.Generator().manual_seed(stream_seed(seed, "order_" + k))
        order = share(torch.randperm(len(mixed), generator=g).tolist(), rank, world)
        order = order[:len(order) - (len(order) % per == 1)]
        streams.append(batches(names, per, rank_seed(stream_seed(seed, "views_" + k), rank), order))
    return zip(*streams) if stream_b else ((batch, None) for batch in streams[0])


def main():
    cfg = check_settings(vars(settings_parser(DATA_CONFIG, "Per-class counts of the mixed training set.").parse_args()),
                         DATA_CONFIG)
    m = build_mixed(**cfg)
    planted = lambda s: f" {s:>7}" if cfg["syn_noise"] else ""
    print(f"{'class':>5} {'name':<16} {'real':>6} {'synthetic':>9}{planted('planted')} {'group':>6}")
    for c, name in enumerate(m.classes):
        print(f"{c:>5} {name:<16} {m.n_real[c]:>6} {m.n_syn[c]:>9}{planted(m.n_noisy[c])} {shot_group(m.n_real[c]):>6}")
    groups = {g: sum(shot_group(n) == g for n in m.n_real) for g in ("many", "medium", "few")}
    print(f"total: {sum(m.n_real)} real + {sum(m.n_syn)} synthetic = {len(m)} images; classes per group: {groups}"
          + (f"; planted wrong-class images among the synthetic: {sum(m.n_noisy)}" if cfg["syn_noise"] else ""))


if __name__ == "__main__":
    run_cli(main)
