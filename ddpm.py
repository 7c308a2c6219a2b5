"""generate.py --generator ddpm (ours, DiffuLT's recipe): a class-conditional DDPM trained on the
long-tailed real subset, a pool with no download; its training resumes from state.pt."""
import hashlib
import os
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import data


def ddpm_unet(num_classes, width):
    """A DDPM-CIFAR-shaped class-conditional UNet; class num_classes is guidance's null class."""
    from diffusers import UNet2DModel
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(width, 2 * width, 2 * width, 2 * width), norm_num_groups=min(32, width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=num_classes + 1)


def save_ddpm(folder, unet, ema, state):
    """Both networks and the training state, swapped in whole: a kill keeps the last."""
    def save(tmp):
        unet.save_pretrained(os.path.join(tmp, "unet"))
        ema.save_pretrained(os.path.join(tmp, "ema"))
        torch.save(state, os.path.join(tmp, "state.pt"))
    cli.write_atomic(folder, save)


class Trained(NamedTuple):  # train_ddpm's model and what the manifest records of it
    ema: torch.nn.Module  # the EMA network, in eval mode: it samples
    settings: dict
    sha256: str  # of its weights file
    losses: list  # this call's training losses


def train_ddpm(cfg, folder, device, log=print, world=1):
    """Train, resume or reuse the model (Trained)."""
    from diffusers import DDPMScheduler, UNet2DModel
    cli.restored(folder)
    names = data.class_names(cfg["dataset"], cfg["data_root"])
    images, labels = data.load_cifar(cfg["dataset"], cfg["data_root"], train=True)
    keep = data.long_tail_indices(labels, cfg["imb"], cfg["data_seed"], cfg["split"])
    x_all = torch.from_numpy(images[keep]).permute(0, 3, 1, 2).to(device)
    y_all = torch.from_numpy(labels[keep]).to(device)
    settings = {"imb": cfg["imb"], "data_seed": cfg["data_seed"], "real_images": len(keep),
                "width": cfg["ddpm_width"], "train_steps": cfg["train_steps"],
                "train_batch": cfg["train_batch"], "lr": cfg["train_lr"], "warmup": cfg["warmup"],
                "lr_schedule": cfg["lr_schedule"], "ema": cfg["ema"],
                "ema_warmup": "min(ema, (1+s)/(10+s))", "label_dropout": cfg["label_dropout"],
                "sampling": cfg["sampling"], "hflip": True, "seed": cfg["seed"],
                # named when not the default: models trained before it still load
                **({"split": cfg["split"]} if cfg["split"] != "seeded" else {})}
    torch.manual_seed(cfg["seed"])  # the initial weights
    unet = ddpm_unet(len(names), cfg["ddpm_width"]).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["train_lr"], weight_decay=0.0)
    step, rng = 0, torch.Generator(device).manual_seed(cfg["seed"])  # every draw on the device
    if os.path.isfile(os.path.join(folder, "state.pt")):
        try:
            state = torch.load(os.path.join(folder, "state.pt"), map_location="cpu",
                               weights_only=True)
        except Exception as e:  # truncated, or what weights_only refuses
            raise cli.SAUError(f"{folder}/state.pt is unreadable ({e.__class__.__name__}): "
                               f"delete {folder} to train the model again") from None
        differ = cli.config_diff(state["settings"], settings, ignore={"train_steps"})
        if differ:
            raise cli.SAUError(
                f"{folder} holds a model trained with other settings ({', '.join(differ)}): "
                f"use the same flags or another --pool folder")
        unet = UNet2DModel.from_pretrained(os.path.join(folder, "unet")).to(device)
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg["train_lr"], weight_decay=0.0)
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        if step < cfg["train_steps"] and len(state["rng"]) == len(rng.get_state()):
            rng.set_state(state["rng"])
        # a CUDA generator's state is 16 bytes, a CPU one's 5056: not transferable
        elif step < cfg["train_steps"]:
            rng.manual_seed(cli.derived_seed(cfg["seed"], step))
            log(f"{folder}: trained so far on another device type; its random stream goes on from "
                f"a seed of (--seed, step {step}): other weights than a run that never moved")
    if step:
        ema = UNet2DModel.from_pretrained(os.path.join(folder, "ema"))
    else:
        ema = ddpm_unet(len(names), cfg["ddpm_width"])
        ema.load_state_dict(unet.state_dict())
    ema = ema.to(device).requires_grad_(False)
    if step < cfg["train_steps"] and world > 1:
        raise cli.SAUError("the class-conditional model is not trained yet: train it in one "
                           "process (without --shard), then sample with several")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    warm = lambda s: min(1.0, (s + 1) / max(cfg["warmup"], 1))
    cosine = cfg["lr_schedule"] == "cosine"
    shape = lambda s: 0.5 * (1 + np.cos(np.pi * s / cfg["train_steps"])) if cosine else 1.0
    counts = torch.bincount(y_all, minlength=len(names)).float()
    weights = 1 / counts[y_all] if cfg["sampling"] == "balanced" else torch.ones_like(counts[y_all])
    if step < cfg["train_steps"]:
        log(f"training the class-conditional UNet ({sum(p.numel() for p in unet.parameters()):,} "
            f"parameters) on {len(keep)} real images, steps {step + 1}-{cfg['train_steps']}")
    losses, t0 = [], time.time()
    bar = tqdm(total=cfg["train_steps"], initial=step, unit="step", desc="training",
               dynamic_ncols=True, disable=step >= cfg["train_steps"])
    unet.train()
    while step < cfg["train_steps"]:
        batch = ddpm_batch(x_all, y_all, weights, cfg["train_batch"], cfg["label_dropout"],
                           len(names), rng)
        # warm-up: early EMA weights are not mostly the random init
        decay = min(cfg["ema"], (1 + step) / (10 + step))
        lr = float(cfg["train_lr"] * warm(step) * shape(step))
        losses.append(ddpm_step(unet, ema, opt, scheduler, batch, lr, decay))
        step += 1
        bar.update(1)
        if step % 50 == 0 or step == cfg["train_steps"]:
            bar.set_postfix(loss=f"{torch.stack(losses[-50:]).mean().item():.4f}")
        if step % cfg["ckpt_every"] == 0 or step == cfg["train_steps"]:
            save_ddpm(folder, unet, ema, {"step": step, "settings": settings,
                                          "optimizer": opt.state_dict(), "rng": rng.get_state()})
    bar.close()
    if losses:
        n, seconds = len(losses), time.time() - t0
        tenth = max(n // 10, 1)
        log(f"trained {n} steps in {seconds:.1f}s ({n * cfg['train_batch'] / seconds:.1f} "
            f"images/s); loss {torch.stack(losses[:tenth]).mean().item():.4f} (first tenth) -> "
            f"{torch.stack(losses[-tenth:]).mean().item():.4f} (last tenth)")
    weights_file = next(f for f in sorted(os.listdir(os.path.join(folder, "ema")))
                        if f.endswith(".safetensors"))
    with open(os.path.join(folder, "ema", weights_file), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return Trained(ema.eval(), settings, sha, [v.item() for v in losses])


def ddpm_batch(x_all, y_all, weights, n, label_dropout, null, g):
    """(x0, labels, noise, t) of one training batch, drawn on g's device."""
    dev = g.device
    idx = torch.multinomial(weights, n, replacement=True, generator=g)
    x0 = x_all[idx].float() / 127.5 - 1
    x0 = torch.where((torch.rand(n, generator=g, device=dev) < 0.5)[:, None, None, None],
                     x0.flip(-1), x0)
    y = torch.where(torch.rand(n, generator=g, device=dev) < label_dropout, null, y_all[idx])
    noise = torch.randn(x0.shape, generator=g, device=dev)
    return x0, y, noise, torch.randint(0, 1000, (n,), generator=g, device=dev)


def ddpm_step(unet, ema, opt, scheduler, batch, lr, decay):
    """One AdamW step on the noise-prediction loss and the EMA update; the loss, no sync."""
    x0, y, noise, t = batch
    xt = scheduler.add_noise(x0, noise, t)
    for group in opt.param_groups:
        group["lr"] = lr  # a plain float: state.pt loads weights_only
    with torch.autocast(x0.device.type, torch.bfloat16, enabled=x0.device.type == "cuda"):
        pred = unet(xt, t, class_labels=y).sample
    loss = F.mse_loss(pred.float(), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)
    return loss.detach()
