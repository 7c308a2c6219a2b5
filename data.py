"""Data only: CIFAR, the long-tailed subset, the synthetic pool, the mixed set, the batch streams.

    python data.py --dataset cifar10 --imb 100      # per-class real/synthetic counts
"""
import dataclasses
import glob
import json
import os
import pickle
import re
import shutil
import tempfile
from typing import NamedTuple

import numpy as np
import torch

import cli
import views


class Cifar(NamedTuple):  # a dataset's python-layout files, the torchvision class fetching them
    folder: str
    train: list
    test: str
    labels: str  # the labels' key in a batch file, names the class names' in the meta file
    names: str
    meta: str
    classes: int
    source: str


DATASETS = {
    "cifar10": Cifar("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                     "labels", "label_names", "batches.meta", 10, "CIFAR10"),
    "cifar100": Cifar("cifar-100-python", ["train"], "test", "fine_labels", "fine_label_names",
                      "meta", 100, "CIFAR100"),
}
SYN_MODES = ("pool", "none", "heldout")
SPLITS = ("seeded", "reference", "ldam")
REFERENCE_SEED = 35180  # the SAU authors' main.py --seed, set before their data set draws
LDAM_SEED = 0  # LDAM-DRW's rand_number
SHARD_RE = re.compile(r"^c(\d{3})_(\d{6})\.npz$")
# each stream of an epoch's random draws has its own seed
STREAMS = ("order_a", "order_b", "views_a", "views_b", "prototypes", "mix")


def stream_seed(seed, epoch, stream):
    """The seed of one stream of an epoch's draws: a function of (seed, epoch, stream) alone, so a
    resumed run draws what an uninterrupted one does."""
    return (seed * 1_000_003 + epoch) * len(STREAMS) + STREAMS.index(stream)


# the flags of every script that builds the mixed set (data.py, train.py; generate.py some)
S = cli.Setting
DATA_CONFIG = {
    "dataset": S("cifar10", "cifar10 | cifar100", choices=tuple(DATASETS), tag="", named="always"),
    "imb": S(100.0, "imbalance factor: head / tail real images", cli.AT_LEAST_1, named="always"),
    "syn": S("pool", "tail fill: pool (generate.py's images) | none (plain long-tailed set) | "
             "heldout (unused real images, ours)", choices=SYN_MODES, tag="", named="always"),
    "syn_ratio": S(1.0, "fraction of each class's synthetic fill that is used", cli.NON_NEGATIVE,
                   tag="r"),
    "syn_noise": S(0.0, "fraction of each class's fill drawn from the other classes': planted "
                   "wrong-class images that measure the relabel rule (ours)", cli.FRACTION,
                   tag="noise"),
    "pool": S("", "synthetic pool folder; empty: <data-root>/synthetic/<dataset>", named="never"),
    "data_root": S("./data", "folder holding the CIFAR python-layout files", scope="runtime"),
    "data_seed": S(0, "seed of the long-tailed subset and the synthetic draw", cli.SEED, tag="ds"),
    "split": S("seeded", "the long-tailed subset: seeded (by --data-seed, ours) | reference (the "
               "SAU authors') | ldam (LDAM-DRW's, the standard one)", choices=SPLITS, tag="split"),
}
DATA_IGNORED = [
    *[(k, lambda c: c["syn"] == "none", "with --syn none")
      for k in ("syn_ratio", "syn_noise", "pool")],
    ("pool", lambda c: c["syn"] == "heldout", "with --syn heldout"),
    *[(k, lambda c: c["syn_ratio"] == 0, "with --syn-ratio 0 (no fill)")
      for k in ("syn_noise", "pool")],
    ("data_seed", lambda c: c["split"] != "seeded", "with --split reference or ldam"),
]


# ---------------------------------------------------------------- CIFAR


REFETCH = "delete the folder and fetch CIFAR again"


def _unpickle(path):
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
    except Exception as e:  # missing, truncated, not a pickle, a pickle of a class we do not have
        raise cli.SAUError(f"cannot read {path} ({e.__class__.__name__}): {REFETCH}") from None
    if not isinstance(d, dict):
        raise cli.SAUError(f"{path} holds a {type(d).__name__}, not CIFAR's dict: {REFETCH}")
    return d


def cifar_folder(dataset, root):
    """The dataset's folder under root, downloaded if missing by one process at a time (a lock file
    in root) into a temporary folder renamed when whole."""
    d = DATASETS[dataset]
    folder = os.path.join(root, d.folder)
    if os.path.isdir(folder):
        return folder
    import torchvision.datasets
    source = getattr(torchvision.datasets, d.source)
    with cli.one_at_a_time(os.path.join(cli.writable_folder(root, "--data-root"), ".lock")):
        if os.path.isdir(folder):  # fetched while it waited
            return folder
        tmp = tempfile.mkdtemp(dir=root, prefix=".download.")
        try:
            source(tmp, train=True, download=True)
            os.replace(os.path.join(tmp, d.folder), folder)
        except Exception as e:  # any network or archive failure ends the same way
            raise cli.SAUError(
                f"{dataset} not found at {folder} and the download failed "
                f"({e.__class__.__name__}): fetch {source.url} elsewhere, then tar xzf "
                f"{source.filename} -C {root}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def class_names(dataset, root):
    d, folder = DATASETS[dataset], cifar_folder(dataset, root)
    path = os.path.join(folder, d.meta)
    names = _unpickle(path).get(d.names)
    if not (isinstance(names, list) and len(names) == d.classes
            and all(isinstance(n, str) for n in names)):
        raise cli.SAUError(f"{path} has no list of {d.classes} class names: {REFETCH}")
    return names


def load_cifar(dataset, root, train):
    """(images uint8 [N, 32, 32, 3] RGB HWC, labels int64 [N]) of the train or test split."""
    d, folder = DATASETS[dataset], cifar_folder(dataset, root)
    xs, ys = [], []
    for name in (d.train if train else [d.test]):
        path = os.path.join(folder, name)
        batch = _unpickle(path)
        try:
            x, y = np.asarray(batch["data"]), np.asarray(batch[d.labels])
            ok = (x.ndim == 2 and x.shape[1] == 3072 and y.shape == (len(x),) and len(y)
                  and np.issubdtype(y.dtype, np.integer) and np.issubdtype(x.dtype, np.integer)
                  and x.min() >= 0 and x.max() <= 255 and y.min() >= 0 and y.max() < d.classes)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise cli.SAUError(f"{path} is not a CIFAR batch ('data' [n, 3072] in 0-255, "
                               f"{d.labels!r} [n] in 0-{d.classes - 1}): {REFETCH}")
        xs.append(x.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(y.astype(np.int64))
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


# ---------------------------------------------------------------- long tail


def lt_counts(n_max, num_classes, imb):
    """Real images kept per class: n_max * (1/imb)^(c/(C-1)), class 0 the head."""
    return [int(n_max * (1 / imb) ** (c / (num_classes - 1))) for c in range(num_classes)]


def long_tail_indices(labels, imb, seed, split="seeded"):
    """Positions of the long-tailed subset in the train set, ascending per class in label order.
    seeded: drawn from a generator of the data seed (ours); reference: the SAU authors': numpy
    seeded 35180, then per class choice(n, n_c) for the real images and choice(n, n_max - n_c)
    for the synthetic ones; ldam: LDAM-DRW's: numpy seeded 0, each class shuffled, n_c kept."""
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1
    n_max = int(np.bincount(labels, minlength=num_classes).max())
    counts = lt_counts(n_max, num_classes, imb)
    if split == "seeded":
        rng = np.random.default_rng(seed)
        keep = [np.sort(rng.choice(np.flatnonzero(labels == c), n, replace=False))
                for c, n in enumerate(counts)]
        return np.concatenate(keep)
    # the legacy generator, as np.random.seed(...) then np.random.choice/shuffle draw from it
    rs = np.random.RandomState(REFERENCE_SEED if split == "reference" else LDAM_SEED)
    keep = []
    for c, n in enumerate(counts):
        of_c = np.flatnonzero(labels == c)
        if split == "reference":
            keep.append(np.sort(of_c[rs.choice(len(of_c), n, replace=False)]))
            rs.choice(len(of_c), n_max - n, replace=False)  # their synthetic draw: consumed
        else:
            rs.shuffle(of_c)
            keep.append(np.sort(of_c[:n]))
    return np.concatenate(keep)


GROUPS = ("many", "medium", "few")  # by real training images: > 100, 21-100, <= 20


def shot_group(n_real):
    return "many" if n_real > 100 else "medium" if n_real > 20 else "few"


# ---------------------------------------------------------------- synthetic pool


def shard_name(label, start):
    return f"c{label:03d}_{start:06d}.npz"


def read_manifest(folder):
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        raise cli.SAUError(f"no synthetic pool at {folder} (no manifest.json): run generate.py, "
                           f"pass --pool, or train with --syn heldout / none")
    try:
        with open(path) as f:
            m = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise cli.SAUError(f"{path} is not JSON ({e.__class__.__name__}): regenerate the "
                           f"pool") from None
    if not (isinstance(m, dict) and isinstance(m.get("dataset"), str)
            and isinstance(m.get("classes"), list) and isinstance(m.get("generator", {}), dict)):
        raise cli.SAUError(f"{path} is malformed: regenerate the pool")
    return m


def pool_shards(folder):
    """{label: [(start, path)]} sorted by start."""
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
        raise cli.SAUError(f"pool shard {path} is unreadable ({e.__class__.__name__}): delete it, "
                           f"rerun generate.py") from None
    if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3)
            or seeds.shape != (len(images),)):
        raise cli.SAUError(f"pool shard {path} holds {images.dtype}{list(images.shape)}, expected "
                           f"uint8 [n, 32, 32, 3] with n seeds: regenerate it")
    return images


def read_pool(folder, dataset, classes):
    """{label: uint8 [n, 32, 32, 3]} of a pool made for this dataset, its shards checked."""
    manifest = read_manifest(folder)
    if manifest["dataset"] != dataset:
        raise cli.SAUError(f"the pool at {folder} was made for {manifest['dataset']}, not "
                           f"{dataset}: pass --pool with a {dataset} pool")
    if list(manifest["classes"]) != list(classes):
        raise cli.SAUError(f"the pool at {folder} names other classes than {dataset}'s: regenerate "
                           f"it")
    pool = {}
    for c, shards in pool_shards(folder).items():
        if c >= len(classes):
            raise cli.SAUError(f"pool shard {shards[0][1]} is for class {c}, but {dataset} has "
                               f"{len(classes)} classes")
        parts, expected = [], 0
        for start, path in shards:
            if start != expected:
                what = "gap" if start > expected else "overlap"
                raise cli.SAUError(f"pool for class {c} has a {what} at index "
                                   f"{min(start, expected)} ({path}): rerun generate.py to fill a "
                                   f"gap, or delete the overlapping shard")
            parts.append(read_shard(path))
            expected = start + len(parts[-1])
        pool[c] = np.concatenate(parts)
    return pool


# ---------------------------------------------------------------- the mixed set


@dataclasses.dataclass
class MixedSet:
    """The long-tailed real subset topped up per class."""
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    labels: np.ndarray  # [N]
    is_syn: np.ndarray  # [N] bool
    is_noisy: np.ndarray  # [N] bool: --syn-noise's planted images (synthetic too)
    n_real: list  # per class
    n_syn: list
    n_noisy: list
    classes: list  # names, in label order
    dataset: str
    subset: np.ndarray  # the real images' positions in the official train set

    def __len__(self):
        return len(self.labels)


def pool_folder(cfg):  # --pool, else <data-root>/synthetic/<dataset>
    return cfg["pool"] or os.path.join(cfg["data_root"], "synthetic", cfg["dataset"])


def fill_counts(n_real, n_max, syn="pool", syn_ratio=1.0):  # syn_ratio of the fill to n_max
    return [0 if syn == "none" else int(round(syn_ratio * (n_max - n))) for n in n_real]


def build_mixed(dataset, data_root="./data", imb=100, data_seed=0, syn="pool", syn_ratio=1.0,
                pool=None, syn_noise=0.0, split="seeded"):
    classes = class_names(dataset, data_root)
    images, labels = load_cifar(dataset, data_root, train=True)
    keep = long_tail_indices(labels, imb, data_seed, split)
    num_classes = len(classes)
    n_real = np.bincount(labels[keep], minlength=num_classes).tolist()
    n_fill = fill_counts(n_real, int(np.bincount(labels).max()), syn, syn_ratio)
    n_noisy = [int(round(syn_noise * n)) for n in n_fill]
    # the fill and the planted images each have a stream: --syn-noise 0 changes nothing
    rng = np.random.default_rng([data_seed, 1])
    plant_rng = np.random.default_rng([data_seed, 2])
    xs, ys = [images[keep]], [labels[keep]]
    ss, ns = [np.zeros(len(keep), bool)], [np.zeros(len(keep), bool)]
    if not any(n_fill):  # --syn none, or --syn-ratio 0: no source is read
        source = {}
    elif syn == "heldout":
        left = np.setdiff1d(np.arange(len(labels)), keep)
        source = {c: images[left[labels[left] == c]] for c in range(num_classes)}
        hint = "lower --syn-ratio (heldout has only the images the subset left out)"
    elif syn == "pool":
        folder = pool_folder({"pool": pool, "data_root": data_root, "dataset": dataset})
        source = read_pool(folder, dataset, classes)
        hint = f"generate more (generate.py --dataset {dataset} --imb {imb:g}) or lower --syn-ratio"
    for c, (n, k) in enumerate(zip(n_fill, n_noisy)):
        if n == 0:
            continue
        have = len(source.get(c, ()))
        if have < n - k:
            raise cli.SAUError(f"class {c} ({classes[c]}) needs {n - k} synthetic images but the "
                               f"{syn} source holds {have}: {hint}")
        xs.append(source[c][np.sort(rng.choice(have, n - k, replace=False))])
        if k:  # planted: drawn uniformly from the other classes' sources pooled, labelled c
            others = [o for o in range(num_classes) if o != c and len(source.get(o, ()))]
            ends = np.cumsum([len(source[o]) for o in others])
            if not len(ends) or ends[-1] < k:
                raise cli.SAUError(f"class {c} ({classes[c]}) needs {k} planted images but the "
                                   f"others' {syn} source holds {ends[-1] if len(ends) else 0}: "
                                   f"lower --syn-noise")
            pick = np.sort(plant_rng.choice(int(ends[-1]), k, replace=False))
            which = np.searchsorted(ends, pick, side="right")
            xs.append(np.stack([source[others[w]][i - (ends[w - 1] if w else 0)]
                                for w, i in zip(which, pick)]))
        ys.append(np.full(n, c, np.int64))
        ss.append(np.ones(n, bool))
        ns.append(np.arange(n) >= n - k)
    return MixedSet(images=np.ascontiguousarray(np.concatenate(xs)), labels=np.concatenate(ys),
                    is_syn=np.concatenate(ss), is_noisy=np.concatenate(ns), n_real=n_real,
                    n_syn=n_fill, n_noisy=n_noisy, classes=classes, dataset=dataset, subset=keep)


# ---------------------------------------------------------------- the batch streams


class Batches:
    """(view names, batch size, seed, order) -> views.Batch's of the mixed set in that order: the
    set on the device, each batch with its views' random numbers, a function of the seed alone."""

    def __init__(self, mixed, device="cpu"):
        self.images = torch.from_numpy(mixed.images).permute(0, 3, 1, 2).to(device).contiguous()
        self.labels = torch.from_numpy(mixed.labels).to(device)
        self.is_syn = torch.from_numpy(mixed.is_syn).to(device)
        self.views = views.DeviceViews(mixed.dataset, self.images.device)

    def __call__(self, names, batch_size, seed, order):
        g = torch.Generator(self.images.device).manual_seed(seed)
        order = torch.as_tensor(order, dtype=torch.long).to(self.images.device)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield views.Batch(self.images[idx], self.views.draw(names, len(idx), g),
                              self.labels[idx], self.is_syn[idx], idx)


def train_streams(mixed, batch_size, seed, epoch, views_a=("v1", "v2", "v3"), stream_b=True,
                  batches=None):
    """Per step (batch A, batch B): A with views_a and B with v1 (None without stream_b), from two
    shuffles of the epoch. A last batch of one image cannot train BatchNorm: it waits for the next
    epoch."""
    batches = batches or Batches(mixed)
    streams = []
    for k, names in zip("ab", [views_a] + ([("v1",)] if stream_b else [])):
        g = torch.Generator().manual_seed(stream_seed(seed, epoch, "order_" + k))
        order = torch.randperm(len(mixed), generator=g).tolist()
        order = order[:len(order) - (len(order) % batch_size == 1)]
        streams.append(batches(names, batch_size, stream_seed(seed, epoch, "views_" + k), order))
    return zip(*streams) if stream_b else ((batch, None) for batch in streams[0])


def main(argv=None):
    table = {**DATA_CONFIG, "save_indices": cli.Setting(
        "", "write the subset's positions in the official train set to this file, one a line",
        scope="call")}
    cfg = cli.parse_settings(table, DATA_IGNORED, "Per-class counts of the mixed set.", argv)
    settings = {k: cfg[k] for k in DATA_CONFIG}
    note = ""
    if cfg["syn"] == "pool" and cfg["syn_ratio"] and not os.path.isfile(
            os.path.join(pool_folder(cfg), "manifest.json")):
        note = f" (no pool at {pool_folder(cfg)} yet: the synthetic column is the fill to make)"
        settings.update(syn="none", syn_noise=0.0)
    m = build_mixed(**settings)
    if note:
        m.n_syn = fill_counts(m.n_real, max(m.n_real), syn_ratio=cfg["syn_ratio"])
    if cfg["save_indices"]:
        cli.write_atomic(cfg["save_indices"], "".join(f"{i}\n" for i in np.sort(m.subset)))
    planted = lambda s: f" {s:>7}" if cfg["syn_noise"] else ""
    print(f"{'class':>5} {'name':<16} {'real':>6} {'synthetic':>9}{planted('planted')} "
          f"{'group':>6}")
    for c, name in enumerate(m.classes):
        print(f"{c:>5} {name:<16} {m.n_real[c]:>6} {m.n_syn[c]:>9}{planted(m.n_noisy[c])} "
              f"{shot_group(m.n_real[c]):>6}")
    groups = {g: sum(shot_group(n) == g for n in m.n_real) for g in GROUPS}
    noisy = f"; planted wrong-class images among the synthetic: {sum(m.n_noisy)}"
    print(f"total: {sum(m.n_real)} real + {sum(m.n_syn)} synthetic = "
          f"{sum(m.n_real) + sum(m.n_syn)} images; classes per group: {groups}"
          + (noisy if cfg["syn_noise"] else "") + note
          + (f"\nsubset ({cfg['split']}): {cfg['save_indices']}" if cfg["save_indices"] else ""))


if __name__ == "__main__":
    cli.run_cli(main)
