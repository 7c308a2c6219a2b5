"""The synthetic tail pool from a diffusers text-to-image pipeline.

    python generate.py                               # CIFAR-10 imb 100 with stabilityai/sd-turbo
    python generate.py --dataset cifar100 --model D  # any text-to-image pipeline, hub id or folder
    python generate.py --shard 1/4 --device cuda:1   # a quarter: one process a GPU, same pool
    python generate.py --bench --batch-size 64       # images/s of --model, nothing written

Image k of class c is a function of (generator settings, seed, c, k): a rerun makes the missing
images, and a killed, resumed or split run writes the same bytes (docs/method.md: the files).
"""
import hashlib
import itertools
import json
import os
import re
import textwrap
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import bench
import cli
import data
import ddpm
import prompting
import report

# (steps, guidance): what each model's card asks for, else the generic ones
MODEL_DEFAULTS = {"stabilityai/sd-turbo": (1, 0.0), "stabilityai/sdxl-turbo": (1, 0.0)}
GENERIC_DEFAULTS, MAX_RETRIES = (30, 7.5), 10
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

S, D, POSITIVE, NON_NEGATIVE = cli.Setting, data.DATA_CONFIG, cli.POSITIVE, cli.NON_NEGATIVE
AT_LEAST_1, UNDER_1 = cli.AT_LEAST_1, (lambda v: 0 <= v < 1, "in [0, 1)")
# the DDPM's settings (ours) are sized for an hour on one GPU
CONFIG = {
    "dataset": D["dataset"],
    "imb": D["imb"]._replace(help="pool of n_max - n_c images per class at this imbalance"),
    "per_class": S(None, "N images for every class instead", NON_NEGATIVE, type=int),
    "data_root": D["data_root"],
    "data_seed": D["data_seed"]._replace(help="the real subset the ddpm generator learns"),
    "split": D["split"]._replace(help="the real subset the ddpm generator learns (train.py's)"),
    "pool": D["pool"]._replace(help="output folder; empty: <data-root>/synthetic/<dataset>"),
    "generator": S("text2image", "text2image: a downloaded pipeline | ddpm: a class-conditional "
                   "DDPM trained here (ours)", choices=("text2image", "ddpm")),
    "model": S("stabilityai/sd-turbo", "diffusers text-to-image pipeline: hub id or folder"),
    "steps": S(None, "inference steps (default: the model's, else 30; ddpm: 50)", AT_LEAST_1,
               type=int),
    "guidance": S(None, "guidance scale (default: the model's, else 7.5; ddpm: 1.5)", NON_NEGATIVE,
                  type=float),
    "resolution": S(None, "generation size in px (default: the model's)",
                    (lambda v: v >= 8 and v % 8 == 0, "a multiple of 8, >= 8"), type=int),
    "prompts": S("", "your file, one prompt a line beginning with the class name"),
    "prompt_style": S("built", "built: prompts/<dataset>.json x variation.json | templates: 'a "
                      "photo of a {}.'", choices=("built", "templates")),
    "prompt_model": S("", "a causal language model that writes 30-50 word prompts first, as the "
                      f"paper's gpt-3.5-turbo did, into <pool>/{prompting.LM_FILE} (ours)"),
    "prompt_batch": S(16, "descriptions per language-model call", AT_LEAST_1),
    "filter": S("none", "clip: make an image again unless CLIP puts its class in its top "
                "--clip-top-k with p >= --clip-min-p (ours)", choices=("none", "clip")),
    "clip_model": S("openai/clip-vit-base-patch32", "CLIP for --filter clip: hub id or folder"),
    "clip_top_k": S(1, "the class among CLIP's top k (1: He et al. 2023)", AT_LEAST_1),
    "clip_min_p": S(0.0, "and CLIP's probability of the class at least this", UNDER_1),
    "resize": S("lanczos", "to 32x32: PIL Lanczos (the paper's) | gpu: antialiased bicubic",
                choices=("lanczos", "gpu")),
    "seed": S(0, "seed of every image's noise", cli.SEED),
    "batch_size": S(16, "images per pipeline call (shapes the bytes: recorded)", AT_LEAST_1),
    "dtype": S("auto", "auto: bf16 on CUDA, else fp32", choices=("auto", "bf16", "fp16", "fp32")),
    "device": cli.DEVICE,
    "compile": S(False, "torch.compile the UNet (pads the last batch)"),
    "shard": S("", "i/N: make every N-th batch from the i-th (one process a GPU)",
               (lambda v: not v or re.fullmatch(r"\d+/\d+", v)
                and int(v.split("/")[0]) < int(v.split("/")[1]), "i/N with 0 <= i < N")),
    "ddpm_width": S(128, "ddpm: UNet base channels (stages w, 2w, 2w, 2w)", AT_LEAST_1),
    "train_steps": S(30000, "ddpm: training steps", AT_LEAST_1),
    "train_batch": S(128, "ddpm: training batch", AT_LEAST_1),
    "train_lr": S(2e-4, "ddpm: AdamW learning rate", POSITIVE),
    "warmup": S(1000, "ddpm: linear lr warm-up steps", NON_NEGATIVE),
    "lr_schedule": S("cosine", "ddpm: lr after warm-up", choices=("cosine", "constant")),
    "ema": S(0.9995, "ddpm: EMA decay of the weights that sample", UNDER_1),
    "label_dropout": S(0.1, "ddpm: share of labels replaced by the null class", UNDER_1),
    "sampling": S("balanced", "ddpm: class-balanced or plain training batches",
                  choices=("balanced", "plain")),
    "sampler": S("ddim", "ddpm: DDIM or DPM-Solver++", choices=("ddim", "dpm")),
    "ckpt_every": S(1000, "ddpm: training steps between checkpoints", AT_LEAST_1),
    "bench": S(False, "time --model's pipeline at --batch-size: images/s, nothing written"),
    "bench_batches": S(3, "timed batches after one warm-up, with --bench", AT_LEAST_1),
}
IGNORED = [
    *[(k, lambda c: c["filter"] == "none", "without --filter clip")
      for k in ("clip_model", "clip_top_k", "clip_min_p")],
    ("prompt_style", lambda c: bool(c["prompts"] or c["prompt_model"]),
     "with --prompts FILE or --prompt-model"),
    ("prompt_model", lambda c: bool(c["prompts"]), "with --prompts FILE"),
    ("prompt_batch", lambda c: not c["prompt_model"], "without --prompt-model"),
    ("prompt_model", lambda c: c["generator"] == "ddpm", "with --generator ddpm"),
    *[x for x in data.DATA_IGNORED if x[0] == "data_seed"],
]


def parse_args(argv=None):
    return cli.parse_settings(CONFIG, IGNORED, __doc__.split("\n")[0], argv)


def image_seed(seed, label, index, attempt=0):  # image k of class c: of these numbers alone
    return cli.derived_seed(seed, label, index, attempt, bits=63)


def plan_batches(targets, batch_size):  # every (label, index), in order, cut into batches
    items = [(c, k) for c, n in enumerate(targets) for k in range(n)]
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


# ---------------------------------------------------------------- the pipelines


def pick(cfg):
    device = cli.use_device(cfg["device"])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[cfg["dtype"]]
    return device, dtype


def load_pipeline(model, dtype):
    """(the pipeline, its weights' variant): in fp16, the repository's fp16 files where it has
    them (sd-turbo's halve the download), else its default ones; in bf16 the default files
    (loading bf16 from fp16 files would round twice)."""
    from diffusers import AutoPipelineForText2Image
    quiet_libraries()
    for variant in (["fp16"] if dtype == torch.float16 else []) + [None]:
        try:
            with warnings.catch_warnings():  # the libraries' deprecation notes
                warnings.simplefilter("ignore")
                return AutoPipelineForText2Image.from_pretrained(
                    model, dtype=dtype, variant=variant, safety_checker=None,
                    requires_safety_checker=False), variant
        except Exception as e:  # a bad folder and a failed download both surface here
            if variant:  # no fp16 files there: the default ones
                continue
            error = e
    if os.path.isdir(model):
        why = f"{error.__class__.__name__}: {str(error).splitlines()[0][:120]}"
        raise cli.SAUError(f"--model {model} is not a diffusers text-to-image pipeline folder "
                           f"({why})")
    raise cli.SAUError(f"could not fetch {model} from the Hugging Face hub "
                       f"({error.__class__.__name__}): pass a local folder with --model")


def quiet_libraries():  # our progress bar and errors, not the libraries' notes and bars
    import diffusers
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    prompting.quiet_transformers()


def broken(x):  # [n] bool on the host: all black (a safety checker's) or not finite
    flat = x.flatten(1)
    return (~flat.isfinite().all(1) | (flat.amax(1) <= 1 / 255)).tolist()


class Maker:
    """Items, prompts and seeds in, checked 32x32 uint8 images out; subclasses say how (raw)."""
    retries, clip, names = 0, None, None

    def to_uint8(self, x):
        """[n, 3, R, R] float -> [n, 32, 32, 3] uint8: 8-bit, then Lanczos (the paper's)."""
        gpu = self.cfg["resize"] == "gpu" and x.shape[-1] != 32
        x = F.interpolate(x, size=(32, 32), mode="bicubic", antialias=True) if gpu else x
        u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        if self.cfg["resize"] == "gpu":
            return u8
        return np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.LANCZOS))
                         for im in u8])

    def make(self, items, prompts):
        """items [(label, index)] -> (uint8 [n, 32, 32, 3], seeds [n], CLIP refusals [n], CLIP p
        [n] or None); a black, non-finite or refused image is made again with the next seed."""
        n, filtered = len(items), self.clip is not None
        seeds = [image_seed(self.cfg["seed"], c, k) for c, k in items]
        refused, p = [0] * n, [None] * n
        x, todo = self.raw(items, prompts, seeds), list(range(n))
        # every image still to make has failed as often as the others: one attempt count
        for attempt in itertools.count(1):
            black = broken(x[todo])
            if filtered:
                kept, p_todo = self.clip(x[todo], [items[i][0] for i in todo])
            else:
                kept, p_todo = [True] * len(todo), [None] * len(todo)
            again = []
            for i, b, k, q in zip(todo, black, kept, p_todo):
                p[i], refused[i] = q, refused[i] + (not b and not k)
                if b or not k:
                    again.append(i)
            if not again:
                return self.to_uint8(x), seeds, refused, p if filtered else None
            if attempt > MAX_RETRIES:
                (c, k), r = items[again[0]], refused[again[0]]
                raise cli.SAUError(
                    f"class {c} ({self.names[c]}) image {k}: {MAX_RETRIES} seeds in a row gave "
                    f"black or non-finite images ({attempt - r}) or images CLIP refused ({r}); "
                    f"check --model, --dtype and --steps"
                    + (", or ease --clip-top-k / --clip-min-p" if filtered else ""))
            for i in again:
                seeds[i] = image_seed(self.cfg["seed"], *items[i], attempt)
            self.retries += len(again)
            x[again] = self.raw([items[i] for i in again], [prompts[i] for i in again],
                                [seeds[i] for i in again])
            todo = again


class ClipFilter:
    """CLIP zero-shot over the classes ("a photo of a <class>."), after He et al. (ICLR 2023)."""

    def __init__(self, cfg, names, device):
        from transformers import CLIPModel, CLIPTokenizer
        try:
            self.model = CLIPModel.from_pretrained(cfg["clip_model"]).to(device).eval()
            tok = CLIPTokenizer.from_pretrained(cfg["clip_model"])
        except Exception as e:  # no such hub id, no network, not a CLIP folder
            raise cli.SAUError(f"--clip-model {cfg['clip_model']}: no CLIP model and tokenizer "
                               f"there ({e.__class__.__name__}): pass a hub id or a folder saved "
                               f"with save_pretrained") from None
        self.cfg, self.device, self.size = cfg, device, self.model.config.vision_config.image_size
        self.mean, self.std = (torch.tensor(v, device=device)[:, None, None]
                               for v in (CLIP_MEAN, CLIP_STD))
        text = tok([f"a photo of a {n.replace('_', ' ')}." for n in names], padding=True,
                   return_tensors="pt")
        with torch.no_grad():  # C x D
            self.text = F.normalize(pooled(self.model.get_text_features(**text.to(device))), dim=-1)
        self.settings = {"type": "clip", "model": cfg["clip_model"], "top_k": cfg["clip_top_k"],
                         "min_p": cfg["clip_min_p"]}

    @torch.no_grad()
    def __call__(self, x, labels):
        """x float [n, 3, R, R] in [0, 1], labels [n] -> host lists (kept, CLIP's p of label)."""
        x = F.interpolate(x.float().nan_to_num().to(self.device), size=(self.size, self.size),
                          mode="bicubic", antialias=True).clamp(0, 1)
        features = self.model.get_image_features(pixel_values=(x - self.mean) / self.std)
        image = F.normalize(pooled(features), dim=-1)
        logits = self.model.logit_scale.exp() * image @ self.text.T  # n x C
        y = torch.tensor(labels, device=self.device)[:, None]
        p = logits.softmax(1).gather(1, y)[:, 0]
        above = (logits > logits.gather(1, y)).sum(1)  # classes CLIP ranks above the label
        kept = (above < self.cfg["clip_top_k"]) & (p >= self.cfg["clip_min_p"])
        return kept.tolist(), p.tolist()


def pooled(out):  # transformers 4 returns the features, 5 an output whose pooler_output they are
    return out if torch.is_tensor(out) else out.pooler_output


class TextToImage(Maker):
    """Any diffusers text-to-image pipeline."""

    def __init__(self, pipe, variant, cfg, device, dtype):
        self.pipe = pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device, self.cfg = device, cfg
        model = cfg["model"]
        steps, guidance = MODEL_DEFAULTS.get(model, GENERIC_DEFAULTS)
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.steps = cfg["steps"] if cfg["steps"] is not None else steps
        self.guidance = cfg["guidance"] if cfg["guidance"] is not None else guidance
        self.resolution = cfg["resolution"] or native
        if cfg["compile"]:
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.unet = torch.compile(self.pipe.unet, fullgraph=True)
        self.settings = {"type": "text2image", "model": model, "steps": self.steps,
                         "guidance": self.guidance, "resolution": self.resolution,
                         "dtype": str(dtype).replace("torch.", ""), "resize": cfg["resize"],
                         "seed": cfg["seed"], "batch_size": cfg["batch_size"],
                         "pipeline": type(pipe).__name__,
                         "scheduler": type(pipe.scheduler).__name__,
                         # named when not the default files: pools made before it still match
                         **({"weights_variant": variant} if variant else {})}

    def raw(self, items, prompts, seeds):
        """float [n, 3, R, R] in [0, 1]; a CPU generator per image: the same noise on any device."""
        n, pad = len(prompts), (self.cfg["batch_size"] - len(prompts)) if self.cfg["compile"] else 0
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds + seeds[-1:] * pad]
        out = self.pipe(prompt=prompts + prompts[-1:] * pad, num_inference_steps=self.steps,
                        guidance_scale=self.guidance, height=self.resolution, width=self.resolution,
                        generator=gens, output_type="pt").images
        return out[:n].float()


class ClassConditional(Maker):
    """The trained class-conditional UNet, DDIM or DPM-Solver, classifier-free guidance."""

    def __init__(self, trained, cfg, device, dtype):  # trained: ddpm.Trained
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
        unet = trained.ema
        self.unet, self.cfg, self.device, self.dtype = unet.to(device), cfg, device, dtype
        config = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").config
        self.sampler = (DDIMScheduler if cfg["sampler"] == "ddim" else
                        DPMSolverMultistepScheduler).from_config(config)
        self.steps = cfg["steps"] if cfg["steps"] is not None else 50
        self.guidance = cfg["guidance"] if cfg["guidance"] is not None else 1.5
        self.null = unet.config.num_class_embeds - 1
        self.settings = {"type": "ddpm", "training": trained.settings,
                         "checkpoint_sha256": trained.sha256,
                         "sampler": cfg["sampler"], "steps": self.steps, "guidance": self.guidance,
                         "seed": cfg["seed"], "batch_size": cfg["batch_size"],
                         "dtype": str(dtype).replace("torch.", "")}

    @torch.no_grad()
    def raw(self, items, prompts, seeds):
        """float [n, 3, 32, 32] in [0, 1]; eps = uncond + guidance * (cond - uncond)."""
        y = torch.tensor([c for c, _ in items], device=self.device)
        labels = torch.cat([y, torch.full_like(y, self.null)])
        # the noise is drawn on the CPU: the same images on every device
        x = torch.stack([torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(s))
                         for s in seeds]).to(self.device)
        self.sampler.set_timesteps(self.steps, device=self.device)
        for t in self.sampler.timesteps:
            with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
                eps = self.unet(torch.cat([x, x]), t, class_labels=labels).sample.float()
            cond, uncond = eps.chunk(2)
            x = self.sampler.step(uncond + self.guidance * (cond - uncond), t, x).prev_sample
        return ((x + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------- the pool on disk


def write_shard(folder, label, start, images, seeds, prompts=None, **extra):
    """One shard, written to a temporary name and renamed."""
    arrays = {"images": np.asarray(images, dtype=np.uint8),
              "seeds": np.asarray(seeds, dtype=np.int64), **extra}
    if prompts is not None:
        arrays["prompts"] = np.asarray(prompts, dtype=str)

    def save(tmp):  # np.savez's layout with a fixed date: same images, same bytes
        with zipfile.ZipFile(tmp, "w") as z:
            for name, arr in arrays.items():
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with z.open(info, "w") as f:
                    np.lib.format.write_array(f, arr, allow_pickle=False)
    path = os.path.join(folder, data.shard_name(label, start))
    cli.write_atomic(path, save)
    return path


def present(folder):  # {label: set of indices on disk}
    have = {}
    for c, shards in data.pool_shards(folder).items():
        for start, path in shards:
            have.setdefault(c, set()).update(range(start, start + len(data.read_shard(path))))
    return have


def check_manifest(folder, manifest):
    """Refuse a pool made for another dataset or with other generator settings; else write it."""
    path = os.path.join(folder, "manifest.json")
    old = data.read_manifest(folder) if os.path.isfile(path) else None
    if old and (old["dataset"], old["classes"]) != (manifest["dataset"], manifest["classes"]):
        raise cli.SAUError(f"{folder} holds a pool made for {old['dataset']}, not "
                           f"{manifest['dataset']}: pass a new --pool folder")
    if "generator" not in manifest:
        return
    settings = {k: v for k, v in (old or {}).get("generator", {}).items() if k not in COUNTS}
    diff = cli.config_diff(settings, manifest["generator"]) if old else []
    if diff:
        raise cli.SAUError(f"{folder} holds a pool made with other generator settings "
                           f"({', '.join(diff)}): use the same flags, or a new --pool folder")
    cli.write_atomic(path, json.dumps(manifest, indent=1))


COUNTS = ("rejected_images", "clip_refused_per_class")  # in the manifest, but not settings


def count_rejected(folder, manifest):
    """The manifest's counts of images made again and of CLIP's refusals per class, over every
    shard; (images on disk, images made again)."""
    total = rejected = 0
    refused = {}
    for c, shards in data.pool_shards(folder).items():
        for _, path in shards:
            with np.load(path) as z:
                total += len(z["seeds"])
                rejected += int(z["rejected"].sum()) if "rejected" in z else 0
                if "clip_refused" in z:
                    name = manifest["classes"][c]
                    refused[name] = refused.get(name, 0) + int(z["clip_refused"].sum())
    manifest["generator"]["rejected_images"] = rejected
    if manifest["generator"].get("filter", "none") != "none":
        manifest["generator"]["clip_refused_per_class"] = {
            n: refused.get(n, 0) for n in manifest["classes"]}
    cli.write_atomic(os.path.join(folder, "manifest.json"), json.dumps(manifest, indent=1))
    return total, rejected


def write_samples(folder, names, per_row=8):
    """samples.png: per class (every tenth beyond 20), its first images with their prompts and,
    filtered, CLIP's probability of the class."""
    plt, shards = report.pyplot(), data.pool_shards(folder)
    rows = [c for c in range(0, len(names), 1 if len(names) <= 20 else 10) if c in shards]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 1, figsize=(per_row * 1.3, len(rows) * 1.75 + 0.3),
                             squeeze=False)
    for ax, c in zip(axes[:, 0], rows):
        images, notes = [], []
        for _, path in shards[c]:
            with np.load(path) as z:
                take = per_row - len(images)
                images += list(data.read_shard(path)[:take])
                prompts = z["prompts"][:take] if "prompts" in z else [""] * take
                p = z["clip_p"][:take] if "clip_p" in z else [None] * take
            notes += [textwrap.shorten(str(t).split(", ", 1)[-1], 60, placeholder="...")
                      + ("" if q is None else f" (CLIP {q:.2f})") for t, q in zip(prompts, p)]
        images += [np.full((32, 32, 3), 255, np.uint8)] * (per_row - len(images))  # blank tiles
        strip = np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=255)
                                for im in images], 1)
        ax.imshow(strip, interpolation="nearest")
        for i, note in enumerate(notes):
            ax.text(34 * i + 17, 35, textwrap.fill(note, 18), ha="center", va="top", fontsize=4.5)
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(names[c], rotation=0, ha="right", va="center", fontsize=8)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.subplots_adjust(left=0.12, right=0.99, top=0.99, bottom=0.8 / fig.get_figheight(),
                        hspace=0.9)  # room below each strip for its prompts
    cli.write_atomic(os.path.join(folder, "samples.png"),
                     lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


# ---------------------------------------------------------------- the pool


def run_bench(cfg, device, dtype):  # --model's pipeline: a warm-up batch, then the timed ones
    gen = TextToImage(*load_pipeline(cfg["model"], dtype), cfg, device, dtype)
    n, templates = cfg["batch_size"], prompting.TEMPLATES
    batch = [(3, k) for k in range(n)], [templates[i % len(templates)].format("cat")
                                         for i in range(n)]
    s, warmup_s = bench.timed(itertools.repeat(batch), lambda b: gen.make(*b),
                              cfg["bench_batches"], 1, device)
    peak = f", peak memory {cli.device_figures(device)[1]}" if device.type == "cuda" else ""
    print(f"bench: {n / s:.3g} images/s at batch {n}, {gen.resolution}px, {gen.steps} step(s), "
          f"{gen.settings['dtype']}, compile {'on' if cfg['compile'] else 'off'}, {device}{peak}; "
          f"warm-up {warmup_s:.1f} s; CIFAR-10 imb 100 (37,594): {37594 * s / n / 60:.1f} min")


def prompt_settings(cfg):  # the manifest's record of the prompts
    sha = lambda *paths: hashlib.sha256(b"".join(open(p, "rb").read() for p in paths)).hexdigest()
    if cfg["prompts"]:
        written = {"written_by": cfg["prompt_model"]} if cfg["prompt_model"] else {}
        return {"file": os.path.basename(cfg["prompts"]), "sha256": sha(cfg["prompts"]), **written}
    if cfg["prompt_style"] == "templates":
        return {"templates": prompting.TEMPLATES}
    tables = (f"{cfg['dataset']}.json", "variation.json")
    return {"built": sha(*(os.path.join(prompting.PROMPTS, f) for f in tables))}


def main(argv=None):
    cli.one_process("generate.py splits a pool with --shard i/N, one process a GPU: start the i-th "
                    "with --device cuda:i --shard i/N (python table.py does)")
    cfg = parse_args(argv)
    device, dtype = pick(cfg)
    if cfg["bench"]:
        return run_bench(cfg, device, dtype)
    names = data.class_names(cfg["dataset"], cfg["data_root"])
    _, labels = data.load_cifar(cfg["dataset"], cfg["data_root"], train=True)
    n_max = int(np.bincount(labels).max())
    targets = ([cfg["per_class"]] * len(names) if cfg["per_class"] is not None
               else [n_max - n for n in data.lt_counts(n_max, len(names), cfg["imb"])])
    folder = data.pool_folder(cfg)
    rank, world = map(int, cfg["shard"].split("/")) if cfg["shard"] else (0, 1)
    if cfg["prompt_model"]:  # the descriptions first, then the pool drawn from them
        path = os.path.join(cli.writable_folder(folder, "--pool"), prompting.LM_FILE)
        counts = [(cfg["per_class"] if cfg["per_class"] is not None else 500) if n else 0
                  for n in targets]
        drawn = prompting.write_lm_prompts(path, names, counts, cfg["prompt_model"],
                                           device, cfg["seed"], cfg["prompt_batch"], world)
        cfg = {**cfg, "prompts": path}
    prompts = prompting.class_prompts(names, cfg["prompts"], cfg["prompt_style"], cfg["dataset"],
                                      cfg["seed"])
    empty = [c for c, n in enumerate(targets) if n and not prompts[c]]
    if empty and cfg["prompt_model"]:
        c = empty[0]
        lm = f"{names[c]}: {drawn[c][0]} lines in {drawn[c][1]} calls" if c in drawn else "none"
        raise cli.SAUError(
            f"--prompt-model {cfg['prompt_model']} wrote no line that was kept for {names[c]} "
            f"({lm}, all refused: not beginning with the class name, not {prompting.WORDS[0]}-"
            f"{prompting.WORDS[1]} words, or repeated): try a larger or instruction-tuned model")
    if empty:
        raise cli.SAUError(f"--prompts {cfg['prompts']} has no line for {names[empty[0]]}: add "
                           f"lines beginning with each class name")
    check_manifest(cli.writable_folder(folder, "--pool"), {"dataset": cfg["dataset"],
                                                             "classes": names})
    if cfg["generator"] == "ddpm":
        trained = ddpm.train_ddpm(cfg, os.path.join(folder, "ddpm"), device, world=world)
        gen = ClassConditional(trained, cfg, device, dtype)
        prompts = {c: [None] for c in range(len(names))}
    else:
        gen = TextToImage(*load_pipeline(cfg["model"], dtype), cfg, device, dtype)
        gen.settings["prompts"] = prompt_settings(cfg)
    gen.names = names
    gen.clip = ClipFilter(cfg, names, device) if cfg["filter"] == "clip" else None
    gen.settings["filter"] = gen.clip.settings if gen.clip else "none"
    manifest = {"dataset": cfg["dataset"], "classes": names, "image_size": 32,
                "generator": gen.settings}
    check_manifest(folder, manifest)
    have = present(folder)
    batches = [b for j, b in enumerate(plan_batches(targets, cfg["batch_size"]))
               if j % world == rank]
    todo = [b for b in batches if any(k not in have.get(c, ()) for c, k in b)]
    if not todo:
        print(f"{folder}: nothing to make ({sum(targets)} images planned, all present)")
        return
    t0, made = time.time(), 0
    desc = f"generating{f' {rank}/{world}' if world > 1 else ''}"
    with tqdm(total=sum(len(b) for b in todo), unit="img", desc=desc, dynamic_ncols=True) as bar:
        for batch in todo:
            retries0 = gen.retries
            texts = [prompts[c][k % len(prompts[c])] for c, k in batch]
            made += write_batch(folder, cfg, batch, have, texts, *gen.make(batch, texts))
            bar.update(len(batch))
            bar.set_postfix(retried=gen.retries - retries0)
    seconds = time.time() - t0
    total, rejected = count_rejected(folder, manifest)
    write_samples(folder, names)
    print(f"made {made} images in {seconds:.1f}s ({made / seconds:.2f} images/s); {folder} holds "
          f"{total}, {rejected} made again after a first try refused; samples.png written")


def write_batch(folder, cfg, batch, have, texts, images, seeds, refused, clip_p):
    """A made batch's new images as shards, one a class and run of consecutive indices; how many."""
    made = 0
    for c in sorted({c for c, _ in batch}):
        rows = [i for i, (ci, k) in enumerate(batch) if ci == c and k not in have.get(c, ())]
        # runs of consecutive indices: [3, 4, 5, 9] -> [3, 4, 5], [9]
        for _, group in itertools.groupby(enumerate(rows), lambda p: p[1] - p[0]):
            run = [i for _, i in group]
            ks = [batch[i][1] for i in run]
            redone = np.array([seeds[i] != image_seed(cfg["seed"], c, k) for i, k in zip(run, ks)])
            clip = {} if clip_p is None else {
                "clip_refused": np.array([refused[i] for i in run]),
                "clip_p": np.array([clip_p[i] for i in run], np.float32)}
            prompts = None if cfg["generator"] == "ddpm" else [texts[i] for i in run]
            write_shard(folder, c, ks[0], images[run], [seeds[i] for i in run], prompts,
                        rejected=redone, **clip)
            made += len(run)
    return made


if __name__ == "__main__":
    cli.run_cli(main)
