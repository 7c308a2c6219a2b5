"""CIFAR, the long-tailed subset, the synthetic pool, the mixed set, the three views, the batch streams.

    python data.py --dataset cifar10 --imb 100      # per-class real/synthetic counts
"""
import argparse
import glob
import json
import math
import os
import pickle
import re
import sys
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from torchvision.transforms.v2.functional._color import _rgb_to_hsv  # batched; torchvision pinned

DATASETS = {  # name: (folder, train files, test file, label key, names key, meta file, torchvision class)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "labels", "label_names", "batches.meta", "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", "fine_label_names", "meta", "CIFAR100"),
}
MEAN_STD = {"cifar10": ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),  # the reference's
            "cifar100": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))}
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
                           metavar=None if s.choices else key.upper(), **extra)
    return p


def check_settings(cfg, table):
    """One line for the first value that is not finite or fails its setting's check."""
    for key, s in table.items():
        v = cfg.get(key)
        if isinstance(v, float) and not math.isfinite(v):
            raise SAUError(f"--{key.replace('_', '-')} must be a finite number, got {v}")
        if v is not None and s.check and not s.check[0](v):
            raise SAUError(f"--{key.replace('_', '-')} must be {s.check[1]}, got {v}")
    return cfg


def pick_device(name):
    """--device auto|cpu|cuda|cuda:N -> torch.device; CUDA asked for where there is none is bad input."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SAUError(f"--device {name}: CUDA is not available here; use --device cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SAUError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


INTERRUPTED = "what was written is complete (each file is renamed into place)"  # a script says how to go on


def run_cli(main):
    prog = os.path.basename(sys.argv[0])
    try:
        main()
    except SAUError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; {INTERRUPTED}", file=sys.stderr)
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
        raise SAUError(f"cannot read {path} ({e.__class__.__name__}): delete the folder and fetch CIFAR again") from None
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


# ---------------------------------------------------------------- views

def random_cutout(x, length=16):  # uint8 [C, H, W]: one square of zeros centred uniformly, clipped at the border
    return cutout(x[None], torch.randint(x.shape[-2], (1,)), torch.randint(x.shape[-1], (1,)), length)[0]


def random_blur(x):  # uint8 [C, H, W]: PIL's GaussianBlur(radius=sigma), sigma ~ U(0.1, 2), as the reference (MoCo v2)
    return gaussian_blur(x[None], torch.empty(1).uniform_(0.1, 2.0))[0]


AA_FILL = 128  # the reference's grey (128, 128, 128) outside the image after shear, translate and rotate


class AutoAugment(T.AutoAugment):
    """torchvision's CIFAR-10 AutoAugment with the reference's numbers (its utils/autoaug.py): grey fill for the
    geometric ops, solarize thresholds linspace(256, 0, 10). Ops stay nearest (the reference shears bicubic)."""

    _AUGMENTATION_SPACE = {**T.AutoAugment._AUGMENTATION_SPACE,
                           "Solarize": (lambda num_bins, height, width: torch.linspace(256.0, 0.0, num_bins) / 255,
                                        False)}  # x 255 (torchvision's bound) = the reference's thresholds

    def __init__(self):
        super().__init__(T.AutoAugmentPolicy.CIFAR10, fill=AA_FILL)


def view_transforms(dataset):
    """{"v1", "v2", "v3", "test"}: uint8 CHW tensor -> normalised float CHW tensor (SAU.md section 4)."""
    mean, std = MEAN_STD[dataset]
    finish = [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    v1 = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    return {
        "v1": T.Compose(v1 + finish),
        "v2": T.Compose(v1 + [AutoAugment(), random_cutout] + finish),
        "v3": T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                         T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                         T.RandomApply([random_blur], p=0.5)] + finish),
        "test": T.Compose(finish),
    }


class Views(torch.utils.data.Dataset):
    """Item i -> (view_1, ..., view_k, label, is_syn, i) for the named views."""

    def __init__(self, images, labels, is_syn, dataset, views, seed=None):
        self.seed = seed
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)  # N x 3 x 32 x 32, a view, no copy
        self.labels, self.is_syn = torch.from_numpy(labels), torch.from_numpy(is_syn)
        transforms = view_transforms(dataset)
        self.transforms = [transforms[v] for v in views]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.seed is not None:  # augmentation a function of (seed, i) alone, whatever --workers is
            torch.default_generator.manual_seed(self.seed * 1_000_003 + int(i))
        x = self.images[i]
        return (*[t(x) for t in self.transforms], self.labels[i], self.is_syn[i], i)


# ---------------------------------------------------------------- the views as batched tensor ops (--loader gpu)
# The same three views, made on the device for a whole batch with per-sample random parameters. torchvision v2 draws
# one parameter set per call, and kornia 0.9 one AutoAugment sub-policy and one colour-jitter order per batch, so each
# op here is ours; test_sau.py checks each against torchvision's kernel for fixed parameters, and the views' pixel
# statistics against the CPU views.

def _col(v):  # [B] -> [B, 1, 1, 1]
    return v.reshape(-1, 1, 1, 1)


def _u8(x):  # float -> uint8 as torchvision does: clamp, then truncate
    return x.clamp(0, 255).to(torch.uint8)


def _gray(xf):  # [B, 3, H, W] float -> [B, 1, H, W], torchvision's weights and order of operations
    return xf[:, 0].mul(0.2989).add_(xf[:, 1], alpha=0.587).add_(xf[:, 2], alpha=0.114)[:, None]


def _blend(xf, other, f):  # xf * f + other * (1 - f) per sample, f float64 [B], rounded as torchvision's _blend
    return _u8(torch.addcmul(xf * _col(f.float()), other, _col((1 - f).float())))


def crop_flip(x, top, left, flip, pad=4):
    """Crop from the zero-padded image at (top, left), then flip where flip. x uint8 [B, C, H, W]."""
    b, _, h, w = x.shape
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = top[:, None] + ar_h  # B x H
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # B x W
    xp = F.pad(x, (pad,) * 4)
    return xp[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def affine_nearest(x, angle, shear_x, shear_y, tx, ty, cx, cy, fill=0):
    """torchvision's affine (nearest, constant fill) with per-sample float64 parameters [B]; (cx, cy) is the centre
    relative to the image centre. x uint8 [B, C, H, W]."""
    b, _, h, w = x.shape
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    bb = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    theta = torch.stack([d, -bb, cx - d * (cx + tx) + bb * (cy + ty),
                         -c, a, cy + c * (cx + tx) - a * (cy + ty)], 1).float().reshape(b, 2, 3)  # the inverse map
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=x.device)
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=x.device)
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=x.device)], -1)  # H x W x 3
    theta = torch.stack([theta[:, 0] / (0.5 * w), theta[:, 1] / (0.5 * h)], 1)  # to grid units; no host tensor
    grid = base.reshape(1, h * w, 3).expand(b, -1, -1).bmm(theta.transpose(1, 2))  # B x HW x 2
    out = F.grid_sample(x.float() - fill, grid.reshape(b, h, w, 2), mode="nearest", padding_mode="zeros",
                        align_corners=False)  # outside the image: 0, so fill after adding it back
    return (out + fill).round().to(torch.uint8)


def _sharpness(xf, f):
    """Blend with the 3x3 smoothed image (border pixels kept), as torchvision's adjust_sharpness. Its kernel
    (1 1 1 / 1 5 1 / 1 1 1) / 13 is summed in whole numbers: no constant copied to the device, no TF32 convolution,
    and the same rounding as torchvision's, since S / 13 never lies within 1/26 of a half."""
    h, w = xf.shape[-2:]
    inner = xf[..., 1:-1, 1:-1]
    blurred = (sum(xf[..., i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3)) + 4 * inner).div(13).round()
    out = xf.clone()
    out[..., 1:-1, 1:-1] = torch.addcmul(inner, blurred - inner, _col((1 - f).float()))
    return _u8(out)


def _autocontrast(xf):
    lo, hi = xf.amin((-2, -1), keepdim=True), xf.amax((-2, -1), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, 1.0, (hi - lo) * (1 / 255))
    return ((xf - torch.where(flat, 0.0, lo)) / scale).clamp(0, 255).to(torch.uint8)


AA_OPS = ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness",
          "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert"]


def autoaugment_op(x, op, mag):
    """One AutoAugment op per sample, as torchvision's: op [B] indexes AA_OPS (-1: none), mag [B] float64 signed
    magnitude. Every op is computed for the whole batch and selected per sample: no host sync, fixed shapes."""
    is_op = {name: op == i for i, name in enumerate(AA_OPS)}
    zero, w, h = torch.zeros_like(mag), x.shape[-1], x.shape[-2]
    shear = is_op["ShearX"] | is_op["ShearY"]  # sheared about the top-left corner, as torchvision's AutoAugment
    sheared = torch.rad2deg(torch.atan(mag))
    geo = affine_nearest(x, torch.where(is_op["Rotate"], -mag, zero), torch.where(is_op["ShearX"], sheared, zero),
                         torch.where(is_op["ShearY"], sheared, zero), torch.where(is_op["TranslateX"], mag.trunc(), zero),
                         torch.where(is_op["TranslateY"], mag.trunc(), zero), torch.where(shear, -w / 2, zero),
                         torch.where(shear, -h / 2, zero), AA_FILL)
    xf, f = x.float(), 1 + mag
    gray = _gray(xf).floor()
    shift = (8 - mag.clamp(0, 8)).long()  # posterize keeps the top mag bits
    results = {
        "Brightness": _u8(xf * _col(f.float())), "Color": _blend(xf, gray, f),
        "Contrast": _blend(xf, gray.mean((1, 2, 3), keepdim=True), f), "Sharpness": _sharpness(xf, f),
        "Posterize": x & _col((255 << shift) & 255).to(torch.uint8),
        "Solarize": torch.where(xf >= _col((255 * mag).float()), 255 - x, x),
        "AutoContrast": _autocontrast(xf), "Equalize": T.functional.equalize(x), "Invert": 255 - x,
    }
    out = torch.where(_col(op <= AA_OPS.index("Rotate")) & _col(op >= 0), geo, x)
    for name, y in results.items():
        out = torch.where(_col(is_op[name]), y, out)
    return out


def _aa_tables(h, w):
    """[25, 2] op index, probability, magnitude and signedness of the CIFAR-10 policy (AutoAugment above)."""
    aa = AutoAugment()
    rows = []
    for policy in aa._policies:
        for name, p, idx in policy:
            space, signed = aa._AUGMENTATION_SPACE[name]
            mags = space(10, h, w)
            rows.append((AA_OPS.index(name), p, 0.0 if mags is None else float(mags[idx]), signed))
    op, p, mag, signed = zip(*rows)
    return (torch.tensor(op).reshape(-1, 2), torch.tensor(p, dtype=torch.float64).reshape(-1, 2),
            torch.tensor(mag, dtype=torch.float64).reshape(-1, 2), torch.tensor(signed).reshape(-1, 2))


def cutout(x, cy, cx, length=16):
    """Zero a length x length square centred at (cy, cx) per sample, clipped at the border."""
    h, w = x.shape[-2:]
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_y = (ys >= cy[:, None] - length // 2) & (ys < cy[:, None] + length // 2)  # B x H
    in_x = (xs >= cx[:, None] - length // 2) & (xs < cx[:, None] + length // 2)  # B x W
    return x.masked_fill(in_y[:, None, :, None] & in_x[:, None, None, :], 0)


def resized_crop(x, top, left, ch, cw, size):
    """Crop the box (top, left, ch, cw) per sample and resize it to size x size, bilinear as torch's upsampling."""
    b, c = x.shape[:2]

    def axis(start, length):  # B x size: the two source indices and the weight of the second
        src = ((torch.arange(size, device=x.device) + 0.5) * (length[:, None] / size) - 0.5).clamp(min=0)
        i0 = src.floor().long().minimum(length[:, None] - 1)
        return start[:, None] + i0, start[:, None] + (i0 + 1).minimum(length[:, None] - 1), src - i0

    y0, y1, wy = axis(top, ch)
    x0, x1, wx = axis(left, cw)
    xf = x.float()
    rows = lambda i: xf.gather(2, i[:, None, :, None].expand(b, c, size, xf.shape[-1]))  # B x C x size x W
    r = rows(y0) + (rows(y1) - rows(y0)) * wy[:, None, :, None]
    cols = lambda i: r.gather(3, i[:, None, None, :].expand(b, c, size, size))
    return (cols(x0) + (cols(x1) - cols(x0)) * wx[:, None, None, :]).round().to(torch.uint8)


def _resized_crop_params(g, b, h, w, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """torchvision's RandomResizedCrop.get_params for b samples: the first of 10 tries that fits, else the image."""
    dev = g.device
    area = h * w * (torch.rand(b, tries, generator=g, device=dev) * (scale[1] - scale[0]) + scale[0])
    log_r = torch.rand(b, tries, generator=g, device=dev) * math.log(ratio[1] / ratio[0]) + math.log(ratio[0])
    cw, ch = (area * log_r.exp()).sqrt().round().long(), (area / log_r.exp()).sqrt().round().long()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.int().argmax(1, keepdim=True)
    cw = torch.where(ok.any(1), cw.gather(1, first)[:, 0], w)
    ch = torch.where(ok.any(1), ch.gather(1, first)[:, 0], h)
    top = (torch.rand(b, generator=g, device=dev) * (h - ch + 1)).long()
    left = (torch.rand(b, generator=g, device=dev) * (w - cw + 1)).long()
    return top, left, ch, cw


HSV_SELECT = [[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]]  # per hue sector: R, G, B from (v p q t)


def _hsv_to_rgb(hsv, select):
    """torchvision's _hsv_to_rgb, op for op, with its table (HSV_SELECT) already on the device: no host copy."""
    h, s, v = hsv.unbind(-3)
    h6 = h * 6
    i = h6.floor()
    sxf = s * (h6 - i)
    q, t, p = ((1.0 - sxf) * v).clamp(0, 1), ((sxf + (1.0 - s)) * v).clamp(0, 1), ((1.0 - s) * v).clamp(0, 1)
    return torch.stack((v, p, q, t), -3).gather(-3, select[:, i.to(torch.int32).remainder(6)].moveaxis(0, -3))


def color_jitter(x, order, bf, cf, sf, hf, select=None):
    """torchvision's ColorJitter with per-sample factors [B] and per-sample order [B, 4] (0 brightness, 1 contrast,
    2 saturation, 3 hue). x uint8 [B, 3, H, W]. Each of the four passes computes all four ops and keeps one per
    sample: fixed shapes, no host sync."""
    select = torch.tensor(HSV_SELECT, device=x.device) if select is None else select
    for k in range(4):
        xf = x.float()
        gray = _gray(xf).floor()
        hsv = _rgb_to_hsv(xf * (1 / 255))
        hsv = torch.stack([(hsv[:, 0] + hf[:, None, None]).remainder(1.0), hsv[:, 1], hsv[:, 2]], 1)
        hue = T.functional.to_dtype(_hsv_to_rgb(hsv, select), torch.uint8, scale=True)
        ys = [_u8(xf * _col(bf)), _blend(xf, gray.mean((1, 2, 3), keepdim=True), cf.double()),
              _blend(xf, gray, sf.double()), hue]
        o = _col(order[:, k])
        x = torch.where(o == 0, ys[0], torch.where(o == 1, ys[1], torch.where(o == 2, ys[2], ys[3])))
    return x


def _pil_box_radius(sigma, passes=3):
    """PIL's _gaussian_blur_radius: the fractional box radius whose `passes` box blurs have variance sigma^2,
    computed in float32 (and float64 where PIL's C does)."""
    s2 = sigma.float() ** 2 / passes
    l = ((torch.sqrt(12.0 * s2.double() + 1.0) - 1.0) / 2.0).floor().float()
    return l + (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) * (l + 1)))


def gaussian_blur(x, sigma, passes=3):
    """PIL's GaussianBlur(radius=sigma) with a per-sample sigma [B] (up to 2.4), bit for bit: three extended box
    blurs along the width, then three along the height, edge pixels repeated, PIL's 24-bit fixed-point weights
    and rounding to uint8 after every pass. x uint8 [B, C, H, W]."""
    r = _pil_box_radius(sigma, passes)
    l = r.floor()
    ww = (float(1 << 24) / (2 * r + 1)).floor().double()  # weight of the 2l + 1 whole pixels
    fw = ((1 << 24) - (2 * l.double() + 1) * ww).div(2).floor()  # weight of the two fractional ones
    d = torch.arange(-2, 3, device=x.device).abs()  # offsets; l <= 1 for sigma < 2.45
    k = torch.where(d <= l[:, None], ww[:, None], torch.where(d == l[:, None] + 1, fw[:, None], 0.0))  # B x 5
    y, (h, w) = x.double(), x.shape[-2:]  # integers below 2^33: exact in float64
    for dim, n, pad in ((3, w, (2, 2, 0, 0)), (2, h, (0, 0, 2, 2))):
        for _ in range(passes):
            yp = F.pad(y, pad, mode="replicate")
            y = sum(_col(k[:, i]) * yp.narrow(dim, i, n) for i in range(5)).add_(1 << 23).div_(1 << 24).floor_()
    return y.to(torch.uint8)


class DeviceViews:
    """view name -> the batched view of uint8 [B, 3, 32, 32] images on their device, random draws from generator g."""

    def __init__(self, dataset, device, size=32):
        mean, std = MEAN_STD[dataset]
        self.mean, self.std = (torch.tensor(s, device=device)[:, None, None] for s in (mean, std))
        self.aa = [t.to(device) for t in _aa_tables(size, size)]
        self.hsv_select = torch.tensor(HSV_SELECT, device=device)  # constants made once, not in every batch

    def finish(self, x):
        return (x.float() * (1 / 255) - self.mean) / self.std

    def v1(self, x, g):
        b = len(x)
        top, left = (torch.randint(9, (b,), generator=g, device=g.device) for _ in range(2))
        return crop_flip(x, top, left, torch.rand(b, generator=g, device=g.device) < 0.5)

    def __call__(self, x, views, g):
        b, _, h, w = x.shape
        rand = lambda *shape: torch.rand(*shape, generator=g, device=g.device)
        out = []
        for v in views:
            if v == "v1":
                out.append(self.finish(self.v1(x, g)))
            elif v == "v2":
                y, (op, p, mag, signed) = self.v1(x, g), self.aa
                k = torch.randint(len(op), (b,), generator=g, device=g.device)  # one sub-policy per sample
                for j in range(2):
                    sign = torch.where(signed[k, j] & (rand(b) <= 0.5), -1.0, 1.0).double()
                    y = autoaugment_op(y, torch.where(rand(b) <= p[k, j], op[k, j], -1), mag[k, j] * sign)
                y = cutout(y, torch.randint(h, (b,), generator=g, device=g.device),
                           torch.randint(w, (b,), generator=g, device=g.device))
                out.append(self.finish(y))
            elif v == "v3":
                top, left, ch, cw = _resized_crop_params(g, b, h, w)
                y = resized_crop(x, top, left, ch, cw, h)
                y = torch.where(_col(rand(b) < 0.5), y.flip(-1), y)
                jittered = color_jitter(y, rand(b, 4).argsort(1), rand(b) * 0.8 + 0.6, rand(b) * 0.8 + 0.6,
                                        rand(b) * 0.8 + 0.6, rand(b) * 0.2 - 0.1, self.hsv_select)
                y = torch.where(_col(rand(b) < 0.8), jittered, y)
                y = torch.where(_col(rand(b) < 0.2), _u8(_gray(y.float())).expand_as(y), y)
                y = torch.where(_col(rand(b) < 0.5), gaussian_blur(y, rand(b) * 1.9 + 0.1), y)
                out.append(self.finish(y))
            else:
                raise ValueError(f"unknown view {v!r}")
        return out


def batch_maker(mixed, loader="cpu", device="cpu", workers=0):
    """(views, batch_size, seed, order) -> an iterable of (*views, labels, is_syn, index) batches of the mixed set
    in that order (index: of each sample in the mixed set). cpu: DataLoader workers with torchvision transforms, as
    the paper; gpu: the set held on `device` as uint8 and each batch's views made there (DeviceViews). Augmentation
    follows the seed alone, whatever --workers is."""
    if loader == "cpu":
        return lambda views, batch_size, seed, order: torch.utils.data.DataLoader(
            Views(mixed.images, mixed.labels, mixed.is_syn, mixed.dataset, views, seed), batch_size=batch_size,
            sampler=order, num_workers=workers, pin_memory=torch.device(device).type == "cuda")
    if loader != "gpu":
        raise ValueError(f"unknown loader {loader!r}: cpu | gpu")
    images = torch.from_numpy(mixed.images).to(device).permute(0, 3, 1, 2).contiguous()  # N x 3 x 32 x 32 uint8
    labels, is_syn = torch.from_numpy(mixed.labels).to(device), torch.from_numpy(mixed.is_syn).to(device)
    view_fn = DeviceViews(mixed.dataset, images.device)

    def batches(views, batch_size, seed, order):
        g = torch.Generator(images.device).manual_seed(seed)
        order = torch.as_tensor(order, dtype=torch.long).to(images.device)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield (*view_fn(images[idx], views, g), labels[idx], is_syn[idx], idx)
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
    for k, views in zip("ab", [views_a] + ([("v1",)] if stream_b else [])):
        g = torch.Generator().manual_seed(stream_seed(seed, "order_" + k))
        order = share(torch.randperm(len(mixed), generator=g).tolist(), rank, world)
        order = order[:len(order) - (len(order) % per == 1)]
        streams.append(batches(views, per, rank_seed(stream_seed(seed, "views_" + k), rank), order))
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
