"""CIFAR, the long-tailed subset, the synthetic pool, the mixed set, the three views, the batch streams.

    python data.py --dataset cifar10 --imb 100      # per-class real/synthetic counts
"""
import argparse
import glob
import json
import os
import pickle
import re
import sys
import zipfile

import numpy as np
import torch
import torchvision.transforms.v2 as T

DATASETS = {  # name: (folder, train files, test file, label key, names key, meta file, torchvision class)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "labels", "label_names", "batches.meta", "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", "fine_label_names", "meta", "CIFAR100"),
}
MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
            "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
SYN_MODES = ("pool", "none", "heldout")
SHARD_RE = re.compile(r"^c(\d{3})_(\d{6})\.npz$")


class SAUError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2, like ours."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def run_cli(main):
    try:
        main()
    except SAUError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)


def write_atomic(path, text_or_save):
    """Write to path + '.tmp', then rename: a kill never leaves a half-written file."""
    tmp = path + ".tmp"
    if isinstance(text_or_save, str):
        with open(tmp, "w") as f:
            f.write(text_or_save)
    else:
        text_or_save(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- CIFAR

def _unpickle(path):
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise SAUError(f"cannot read {path} ({e.__class__.__name__}): delete the folder and fetch CIFAR again")


def _ensure_cifar(dataset, root):
    """The dataset's folder under root, downloaded by torchvision if missing."""
    if dataset not in DATASETS:
        raise SAUError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    folder = os.path.join(root, DATASETS[dataset][0])
    if os.path.isdir(folder):
        return folder
    import torchvision.datasets
    try:
        getattr(torchvision.datasets, DATASETS[dataset][6])(root, train=True, download=True)
    except Exception as e:  # any network or archive failure ends the same way
        raise SAUError(f"{dataset} not found at {folder} and the download failed ({e.__class__.__name__}); "
                       f"put the CIFAR python-layout files there (offline CIFAR-10: "
                       f"python ../shared/data/prepare_cifar.py --root {root})") from None
    return folder


def class_names(dataset, root):
    folder = _ensure_cifar(dataset, root)
    _, _, _, _, names_key, meta, _ = DATASETS[dataset]
    return list(_unpickle(os.path.join(folder, meta))[names_key])


def load_cifar(dataset, root, train):
    """(images uint8 [N, 32, 32, 3] RGB HWC, labels int64 [N]) of the train or test split."""
    folder = _ensure_cifar(dataset, root)
    _, train_files, test_file, label_key, _, _, _ = DATASETS[dataset]
    xs, ys = [], []
    for name in (train_files if train else [test_file]):
        d = _unpickle(os.path.join(folder, name))
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


# ---------------------------------------------------------------- long tail

def lt_counts(n_max, num_classes, imb):
    """Real images kept per class: n_max * (1/imb)^(c/(C-1)), class 0 the head."""
    if imb < 1:
        raise SAUError(f"--imb must be >= 1 (head/tail ratio), got {imb:g}")
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


def write_shard(folder, label, start, images, seeds, prompts=None, **extra):
    """One shard, written to a temporary name and renamed: never a half-written file."""
    arrays = {"images": np.asarray(images, dtype=np.uint8), "seeds": np.asarray(seeds, dtype=np.int64), **extra}
    if prompts is not None:
        arrays["prompts"] = np.asarray(prompts, dtype=str)
    path = os.path.join(folder, shard_name(label, start))
    with zipfile.ZipFile(path + ".tmp", "w") as z:  # np.savez's layout with a fixed date: same images, same bytes
        for name, arr in arrays.items():
            with z.open(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    os.replace(path + ".tmp", path)
    return path


def read_manifest(folder):
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        raise SAUError(f"no synthetic pool at {folder} (manifest.json missing): run python generate.py "
                       f"for this dataset, pass --pool DIR, or train with --syn heldout / --syn none")
    try:
        with open(path) as f:
            manifest = json.load(f)
        manifest["dataset"], manifest["classes"]
    except (ValueError, KeyError, TypeError) as e:
        raise SAUError(f"{path} is malformed ({e.__class__.__name__}: {e}): regenerate the pool") from None
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
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3) or len(seeds) != len(images):
        raise SAUError(f"pool shard {path} holds images {images.dtype}{list(images.shape)}, "
                       f"expected uint8 [n, 32, 32, 3] with n seeds: regenerate it")
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
    """The long-tailed real subset topped up per class; images uint8 [N, 32, 32, 3], labels, is_syn."""

    def __init__(self, images, labels, is_syn, n_real, n_syn, classes, dataset):
        self.images, self.labels, self.is_syn = images, labels, is_syn
        self.n_real, self.n_syn, self.classes, self.dataset = n_real, n_syn, classes, dataset

    def __len__(self):
        return len(self.labels)

    def real(self):
        return self.images[~self.is_syn], self.labels[~self.is_syn]


def build_mixed(dataset, root="./data", imb=100, data_seed=0, syn="pool", syn_ratio=1.0, pool=None):
    if syn not in SYN_MODES:
        raise SAUError(f"unknown --syn {syn!r}: choose one of {', '.join(SYN_MODES)}")
    if syn_ratio < 0:
        raise SAUError(f"--syn-ratio must be >= 0, got {syn_ratio:g}")
    classes = class_names(dataset, root)
    images, labels = load_cifar(dataset, root, train=True)
    keep = long_tail_indices(labels, imb, data_seed)
    num_classes = len(classes)
    n_real = np.bincount(labels[keep], minlength=num_classes).tolist()
    n_max = int(np.bincount(labels).max())
    n_fill = [0 if syn == "none" else int(round(syn_ratio * (n_max - n))) for n in n_real]
    rng = np.random.default_rng([data_seed, 1])  # the fill has its own stream: the subset never depends on it
    xs, ys, ss = [images[keep]], [labels[keep]], [np.zeros(len(keep), bool)]
    if syn == "heldout":
        left = np.setdiff1d(np.arange(len(labels)), keep)
        source = {c: images[left[labels[left] == c]] for c in range(num_classes)}
        hint = "lower --syn-ratio: heldout has only the real images the subset left out"
    elif syn == "pool":
        folder = pool or os.path.join(root, "synthetic", dataset)
        source = read_pool(folder, dataset, classes)
        hint = f"generate more (python generate.py --dataset {dataset} --imb {imb:g}) or lower --syn-ratio"
    for c, n in enumerate(n_fill):
        if n == 0:
            continue
        have = len(source.get(c, ()))
        if have < n:
            raise SAUError(f"class {c} ({classes[c]}) needs {n} synthetic images but the {syn} source holds {have}: {hint}")
        xs.append(source[c][np.sort(rng.choice(have, n, replace=False))])
        ys.append(np.full(n, c, np.int64))
        ss.append(np.ones(n, bool))
    return MixedSet(np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), np.concatenate(ss),
                    n_real, n_fill, classes, dataset)


# ---------------------------------------------------------------- views

class Cutout(torch.nn.Module):
    """One length x length square of zeros, centred uniformly in the image and clipped at the border."""

    def __init__(self, length=16):
        super().__init__()
        self.length = length

    def forward(self, x):  # [..., H, W]
        h, w = x.shape[-2:]
        cy, cx = torch.randint(h, ()).item(), torch.randint(w, ()).item()
        x = x.clone()
        x[..., max(cy - self.length // 2, 0):cy + self.length // 2, max(cx - self.length // 2, 0):cx + self.length // 2] = 0
        return x


def view_transforms(dataset):
    """{"v1", "v2", "v3", "test"}: uint8 CHW tensor -> normalised float CHW tensor (SAU.md section 4)."""
    mean, std = MEAN_STD[dataset]
    finish = [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    v1 = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    return {
        "v1": T.Compose(v1 + finish),
        "v2": T.Compose(v1 + [T.AutoAugment(T.AutoAugmentPolicy.CIFAR10), Cutout(16)] + finish),
        "v3": T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                         T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                         T.RandomApply([T.GaussianBlur(3, sigma=(0.1, 2.0))], p=0.5)] + finish),
        "test": T.Compose(finish),
    }


class Views(torch.utils.data.Dataset):
    """Item i -> (view_1, ..., view_k, label, is_syn) for the named views."""

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
        return (*[t(x) for t in self.transforms], self.labels[i], self.is_syn[i])


def share(order, rank=0, world=1):
    """This process's part of an epoch's order: every world-th index from rank, all parts of equal length."""
    return order[rank::world][:len(order) // world]


def loader(images, labels, is_syn, dataset, views, batch_size, workers, seed, order):
    """A DataLoader over the named views, in the given order; augmentation follows (seed, image index)."""
    return torch.utils.data.DataLoader(Views(images, labels, is_syn, dataset, views, seed), batch_size=batch_size,
                                       sampler=order, num_workers=workers, pin_memory=torch.cuda.is_available())


def train_streams(mixed, batch_size, workers, seed, views_a=("v1", "v2", "v3"), stream_b=True, rank=0, world=1):
    """Per step (A, B): A = (*views_a, y, is_syn) and B = (v1, y, is_syn) from two independent shuffles.
    With several processes each takes a disjoint share of both orders, batch_size / world images a step."""
    streams = []
    for k, views in enumerate([views_a] + ([("v1",)] if stream_b else [])):
        order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(seed * 2 + k)).tolist()
        streams.append(loader(mixed.images, mixed.labels, mixed.is_syn, mixed.dataset, views, batch_size // world,
                              workers, seed * 2 + k, share(order, rank, world)))
    return zip(*streams) if stream_b else ((batch, None) for batch in streams[0])


def main():
    p = Parser(description="Per-class counts of the mixed training set.")
    p.add_argument("--dataset", default="cifar10", choices=list(DATASETS))
    p.add_argument("--imb", type=float, default=100)
    p.add_argument("--syn", default="pool", choices=SYN_MODES)
    p.add_argument("--syn-ratio", type=float, default=1.0)
    p.add_argument("--data-root", default="./data")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--pool", default="")
    a = p.parse_args()
    m = build_mixed(a.dataset, a.data_root, a.imb, a.data_seed, a.syn, a.syn_ratio, a.pool or None)
    print(f"{'class':>5} {'name':<16} {'real':>6} {'synthetic':>9} {'group':>6}")
    for c, name in enumerate(m.classes):
        print(f"{c:>5} {name:<16} {m.n_real[c]:>6} {m.n_syn[c]:>9} {shot_group(m.n_real[c]):>6}")
    groups = {g: sum(shot_group(n) == g for n in m.n_real) for g in ("many", "medium", "few")}
    print(f"total: {sum(m.n_real)} real + {sum(m.n_syn)} synthetic = {len(m)} images; classes per group: {groups}")


if __name__ == "__main__":
    run_cli(main)
