"""The three views of an image as batched tensor ops on the run's device, each sample with its own
random numbers, the same distributions as the reference's torchvision pipeline (the tests' oracle,
op by op for fixed parameters and in distribution).

    v1: random crop 32 (4-pixel zero padding), horizontal flip
    v2: v1, AutoAugment (CIFAR-10 policy, the reference's numbers), Cutout 16x16
    v3: random resized crop (0.2-1), flip, colour jitter (p 0.8), grayscale (p 0.2),
        PIL's Gaussian blur (p 0.5)
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from torchvision.transforms.v2.functional._color import _rgb_to_hsv  # batched; torchvision pinned

MEAN_STD = {"cifar10": ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
            "cifar100": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))}


class Batch(NamedTuple):
    """A batch on the device: its images and its views' random numbers (made into views by
    DeviceViews.apply, inside the step)."""
    images: torch.Tensor  # uint8 B x 3 x 32 x 32
    draws: dict  # view name -> its random numbers (DeviceViews.draw)
    y: torch.Tensor  # B labels
    is_syn: torch.Tensor  # B bool
    index: torch.Tensor  # B: each sample's position in the mixed set


def mean_std(dataset, device="cpu"):  # the reference's normalisation, [3, 1, 1] tensors
    return (torch.tensor(s, device=device)[:, None, None] for s in MEAN_STD[dataset])


def normalize(x, mean, std):
    """A plain uint8 batch normalised (evaluation, audit): / 255, where the views * (1 / 255)."""
    return (x.float() / 255 - mean) / std


# the reference's grey (128, 128, 128) outside the image after shear, translate and rotate
AA_FILL = 128


class AutoAugment(T.AutoAugment):
    """torchvision's CIFAR-10 AutoAugment with the reference's grey fill and solarize thresholds
    linspace(256, 0, 10): the policy's tables (_aa_tables) and the tests' per-image oracle."""

    # Solarize: x 255 (torchvision's bound) = the reference's thresholds
    _AUGMENTATION_SPACE = {**T.AutoAugment._AUGMENTATION_SPACE, "Solarize": (
        lambda num_bins, height, width: torch.linspace(256.0, 0.0, num_bins) / 255, False)}

    def __init__(self):
        super().__init__(T.AutoAugmentPolicy.CIFAR10, fill=AA_FILL)


# ------------------------------------------------- the ops, batched with per-sample parameters
# torchvision v2 draws one parameter set a call, kornia 0.9 one sub-policy and jitter order a batch:
# each op here is ours, tested against torchvision's kernel for fixed parameters.


def _col(v):  # [B] -> [B, 1, 1, 1]
    return v.reshape(-1, 1, 1, 1)


def _pick(images, which):  # per sample b, images[which[b]][b]: K x [B, ...] -> [B, ...]
    return torch.stack(images)[which, torch.arange(len(which), device=which.device)]


def _u8(x):  # float -> uint8 as torchvision does: clamp, then truncate
    return x.clamp(0, 255).to(torch.uint8)


def _gray(xf):  # [B, 3, H, W] float -> [B, 1, H, W], torchvision's weights and order of operations
    return xf[:, 0].mul(0.2989).add_(xf[:, 1], alpha=0.587).add_(xf[:, 2], alpha=0.114)[:, None]


def _blend(xf, other, f):
    return _u8(torch.addcmul(xf * _col(f.float()), other, _col((1 - f).float())))  # as _blend


def crop_flip(x, top, left, flip, pad=4):
    """Crop from the zero-padded image at (top, left), then flip where flip. x uint8 [B, C, H, W]"""
    b, _, h, w = x.shape
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = top[:, None] + ar_h  # B x H
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # B x W
    xp = F.pad(x, (pad,) * 4)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return xp[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def affine_nearest(x, angle, shear_x, shear_y, tx, ty, cx, cy, fill=0):
    """torchvision's affine (nearest, constant fill), per-sample float64 parameters [B]."""
    b, _, h, w = x.shape
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    bb = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    # the inverse map
    theta = torch.stack([d, -bb, cx - d * (cx + tx) + bb * (cy + ty),
                         -c, a, cy + c * (cx + tx) - a * (cy + ty)], 1).float().reshape(b, 2, 3)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=x.device)
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=x.device)
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w),
                        torch.ones(h, w, device=x.device)], -1)  # H x W x 3
    theta = torch.stack([theta[:, 0] / (0.5 * w), theta[:, 1] / (0.5 * h)], 1)
    grid = base.reshape(1, h * w, 3).expand(b, -1, -1).bmm(theta.transpose(1, 2))  # B x HW x 2
    # outside the image: 0, so fill after adding it back
    out = F.grid_sample(x.float() - fill, grid.reshape(b, h, w, 2), mode="nearest",
                        padding_mode="zeros", align_corners=False)
    return (out + fill).round().to(torch.uint8)


def _sharpness(xf, f):
    """torchvision's adjust_sharpness, its kernel (1 1 1 / 1 5 1 / 1 1 1) / 13 summed in whole
    numbers: no TF32 convolution, the same rounding (S / 13 is never within 1/26 of a half)."""
    h, w = xf.shape[-2:]
    inner = xf[..., 1:-1, 1:-1]
    blurred = (sum(xf[..., i:h - 2 + i, j:w - 2 + j] for i in range(3)
                   for j in range(3)) + 4 * inner).div(13).round()
    out = xf.clone()
    out[..., 1:-1, 1:-1] = torch.addcmul(inner, blurred - inner, _col((1 - f).float()))
    return _u8(out)


def _autocontrast(xf):
    lo, hi = xf.amin((-2, -1), keepdim=True), xf.amax((-2, -1), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, 1.0, (hi - lo) * (1 / 255))
    return ((xf - torch.where(flat, 0.0, lo)) / scale).clamp(0, 255).to(torch.uint8)


AA_OPS = ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
          "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert"]


def autoaugment_op(x, op, mag):
    """One AutoAugment op per sample (op [B] in AA_OPS, -1: none; mag [B]): all, then one picked."""
    is_op = {name: op == i for i, name in enumerate(AA_OPS[:5])}  # the geometric ones
    zero, w, h = torch.zeros_like(mag), x.shape[-1], x.shape[-2]
    # sheared about the top-left corner, as torchvision's AutoAugment
    shear = is_op["ShearX"] | is_op["ShearY"]
    sheared = torch.rad2deg(torch.atan(mag))
    geo = affine_nearest(x, torch.where(is_op["Rotate"], -mag, zero),
                         torch.where(is_op["ShearX"], sheared, zero),
                         torch.where(is_op["ShearY"], sheared, zero),
                         torch.where(is_op["TranslateX"], mag.trunc(), zero),
                         torch.where(is_op["TranslateY"], mag.trunc(), zero),
                         torch.where(shear, -w / 2, zero), torch.where(shear, -h / 2, zero),
                         AA_FILL)
    xf, f = x.float(), 1 + mag
    gray = _gray(xf).floor()
    shift = (8 - mag.clamp(0, 8)).long()  # posterize keeps the top mag bits
    results = {
        "Brightness": _u8(xf * _col(f.float())),
        "Color": _blend(xf, gray, f),
        "Contrast": _blend(xf, gray.mean((1, 2, 3), keepdim=True), f),
        "Sharpness": _sharpness(xf, f),
        "Posterize": x & _col((255 << shift) & 255).to(torch.uint8),
        "Solarize": torch.where(xf >= _col((255 * mag).float()), 255 - x, x),
        "AutoContrast": _autocontrast(xf),
        "Equalize": T.functional.equalize(x),
        "Invert": 255 - x,
    }
    # per sample, its op's image: x for none (-1), geo for the five geometric ones, else its own
    return _pick([x, geo, *results.values()], (op - 3).clamp(min=1) * (op >= 0))


def _aa_tables(h, w):
    """[25, 2] op index, probability, magnitude and signedness of the CIFAR-10 policy."""
    aa = AutoAugment()
    rows = []
    for policy in aa._policies:
        for name, p, idx in policy:
            space, signed = aa._AUGMENTATION_SPACE[name]
            mags = space(10, h, w)
            rows.append((AA_OPS.index(name), p, 0.0 if mags is None else float(mags[idx]), signed))
    op, p, mag, signed = zip(*rows)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64).reshape(-1, 2)
    return torch.tensor(op).reshape(-1, 2), f64(p), f64(mag), torch.tensor(signed).reshape(-1, 2)


def cutout(x, cy, cx, length=16):
    """Zero a length x length square centred at (cy, cx) per sample, clipped at the border."""
    h, w = x.shape[-2:]
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_y = (ys >= cy[:, None] - length // 2) & (ys < cy[:, None] + length // 2)  # B x H
    in_x = (xs >= cx[:, None] - length // 2) & (xs < cx[:, None] + length // 2)  # B x W
    return x.masked_fill(in_y[:, None, :, None] & in_x[:, None, None, :], 0)


def resized_crop(x, top, left, ch, cw, size):
    """Crop the box (top, left, ch, cw) per sample, resized bilinear (torch's) to size x size."""
    b, c = x.shape[:2]

    def axis(start, length):  # B x size: the two source indices and the weight of the second
        src = ((torch.arange(size, device=x.device) + 0.5) * (length[:, None] / size) - 0.5)
        src = src.clamp(min=0)
        i0 = src.floor().long().minimum(length[:, None] - 1)
        return start[:, None] + i0, start[:, None] + (i0 + 1).minimum(length[:, None] - 1), src - i0

    y0, y1, wy = axis(top, ch)
    x0, x1, wx = axis(left, cw)
    xf = x.float()
    rows = lambda i: xf.gather(2, i[:, None, :, None].expand(b, c, size, xf.shape[-1]))
    r = rows(y0) + (rows(y1) - rows(y0)) * wy[:, None, :, None]
    cols = lambda i: r.gather(3, i[:, None, None, :].expand(b, c, size, size))
    return (cols(x0) + (cols(x1) - cols(x0)) * wx[:, None, None, :]).round().to(torch.uint8)


def resized_crop_box(area, log_r, top, left, h, w, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop.get_params per sample from uniform draws: the first of ten that fits."""
    area = h * w * (area * (scale[1] - scale[0]) + scale[0])
    log_r = log_r * math.log(ratio[1] / ratio[0]) + math.log(ratio[0])
    cw, ch = (area * log_r.exp()).sqrt().round().long(), (area / log_r.exp()).sqrt().round().long()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.int().argmax(1, keepdim=True)
    cw = torch.where(ok.any(1), cw.gather(1, first)[:, 0], w)
    ch = torch.where(ok.any(1), ch.gather(1, first)[:, 0], h)
    return (top * (h - ch + 1)).long(), (left * (w - cw + 1)).long(), ch, cw


# per hue sector: R, G, B from (v p q t)
HSV_SELECT = [[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]]


def _hsv_to_rgb(hsv, select):
    """torchvision's _hsv_to_rgb, op for op, its table (HSV_SELECT) already on the device."""
    h, s, v = hsv.unbind(-3)
    h6 = h * 6
    i = h6.floor()
    sxf = s * (h6 - i)
    q, t = ((1.0 - sxf) * v).clamp(0, 1), ((sxf + (1.0 - s)) * v).clamp(0, 1)
    p = ((1.0 - s) * v).clamp(0, 1)
    sector = select[:, i.to(torch.int32).remainder(6)].moveaxis(0, -3)
    return torch.stack((v, p, q, t), -3).gather(-3, sector)


def color_jitter(x, order, bf, cf, sf, hf, select=None):
    """torchvision's ColorJitter with per-sample factors [B] and order [B, 4] of the four ops."""
    select = torch.tensor(HSV_SELECT, device=x.device) if select is None else select
    for k in range(4):
        xf = x.float()
        gray = _gray(xf).floor()
        hsv = _rgb_to_hsv(xf * (1 / 255))
        hsv = torch.stack([(hsv[:, 0] + hf[:, None, None]).remainder(1.0), hsv[:, 1], hsv[:, 2]], 1)
        hue = T.functional.to_dtype(_hsv_to_rgb(hsv, select), torch.uint8, scale=True)
        ys = [_u8(xf * _col(bf)), _blend(xf, gray.mean((1, 2, 3), keepdim=True), cf.double()),
              _blend(xf, gray, sf.double()), hue]
        x = _pick(ys, order[:, k])
    return x


def _pil_box_radius(sigma, passes=3):
    """PIL's _gaussian_blur_radius in float32 (float64 where PIL's C is)."""
    # divided by a tensor: CUDA multiplies by the rounded reciprocal of a Python number, and
    # PIL's weights would move by one for some sigmas
    s2 = sigma.float() ** 2 / torch.full_like(sigma, passes, dtype=torch.float)
    n = ((torch.sqrt(12.0 * s2.double() + 1.0) - 1.0) / 2.0).floor().float()
    return n + (2 * n + 1) * (n * (n + 1) - 3 * s2) / (6 * (s2 - (n + 1) * (n + 1)))


def gaussian_blur(x, sigma, passes=3):
    """PIL's GaussianBlur(radius=sigma), per-sample sigma [B] up to 2.4, bit for bit: three box
    blurs along each axis, edges repeated, 24-bit fixed-point weights, rounded every pass."""
    r = _pil_box_radius(sigma, passes)
    n = r.floor()  # PIL's l
    ww = (float(1 << 24) / (2 * r + 1)).floor().double()  # weight of the 2n + 1 whole pixels
    fw = ((1 << 24) - (2 * n.double() + 1) * ww).div(2).floor()  # weight of the two fractional ones
    d = torch.arange(-2, 3, device=x.device).abs()  # offsets; n <= 1 for sigma < 2.45
    k = torch.where(d <= n[:, None], ww[:, None], torch.where(d == n[:, None] + 1, fw[:, None], 0.))
    # integers below 2^35, summed exactly in float64 in any order
    y, k = x.double(), k[:, None, None, None, :]
    for pad in ((2, 2, 0, 0), (0, 0, 2, 2)):
        for _ in range(passes):
            windows = F.pad(y, pad, mode="replicate").unfold(3 if pad[0] else 2, 5, 1)
            y = (windows * k).sum(-1).add_(1 << 23).div_(1 << 24).floor_()
    return y.to(torch.uint8)


class DeviceViews:
    """Batched views: draw, a batch's random numbers; apply, a pure function of images and draws."""

    def __init__(self, dataset, device, size=32):
        self.mean, self.std = mean_std(dataset, device)
        self.aa = [t.to(device) for t in _aa_tables(size, size)]
        self.hsv_select = torch.tensor(HSV_SELECT, device=device)

    def __call__(self, x, names, g):
        return self.apply(x, self.draw(names, len(x), g, *x.shape[-2:]))

    def draw(self, names, b, g, h=32, w=32):
        """{view: {name: [B] or [B, n]}}: uniform floats, or whole numbers below a bound."""
        rand = lambda *shape: torch.rand(*shape, generator=g, device=g.device)
        below = lambda n: torch.randint(n, (b,), generator=g, device=g.device)
        crop = lambda: {"top": below(9), "left": below(9), "flip": rand(b)}
        out = {}
        for v in names:
            if v == "v1":
                out[v] = crop()
            elif v == "v2":  # a sub-policy per sample, its two ops' signs and coins, cutout
                out[v] = {**crop(), "k": below(len(self.aa[0])),
                          "sign_on": [(rand(b), rand(b)) for _ in range(2)],
                          "cy": below(h), "cx": below(w)}
            elif v == "v3":
                out[v] = {"area": rand(b, 10), "log_r": rand(b, 10), "top": rand(b),
                          "left": rand(b), "flip": rand(b), "order": rand(b, 4),
                          "bcs": [rand(b) for _ in range(3)], "hue": rand(b), "jitter": rand(b),
                          "gray": rand(b), "blur": rand(b), "sigma": rand(b)}
            else:
                raise ValueError(f"unknown view {v!r}")
        return out

    def apply(self, x, draws):
        """{view: B x 3 x H x W normalised, fp32}: the views of uint8 x [B, 3, H, W] from its
        draws. fp32 whatever the autocast around it: in bf16 the affine grid moves pixels."""
        with torch.autocast(x.device.type, enabled=False):
            return self._apply(x, draws)

    def _apply(self, x, draws):
        h, w = x.shape[-2:]
        out = {}
        for v, d in draws.items():
            if v in ("v1", "v2"):
                y = crop_flip(x, d["top"], d["left"], d["flip"] < 0.5)
            if v == "v2":
                op, p, mag, signed = self.aa
                k = d["k"]
                for j, (sign, on) in enumerate(d["sign_on"]):
                    sign = torch.where(signed[k, j] & (sign <= 0.5), -1.0, 1.0).double()
                    y = autoaugment_op(y, torch.where(on <= p[k, j], op[k, j], -1),
                                       mag[k, j] * sign)
                y = cutout(y, d["cy"], d["cx"])
            elif v == "v3":
                box = resized_crop_box(d["area"], d["log_r"], d["top"], d["left"], h, w)
                y = resized_crop(x, *box, h)
                y = torch.where(_col(d["flip"] < 0.5), y.flip(-1), y)
                bf, cf, sf = (f * 0.8 + 0.6 for f in d["bcs"])
                jittered = color_jitter(y, d["order"].argsort(1), bf, cf, sf, d["hue"] * 0.2 - 0.1,
                                        self.hsv_select)
                y = torch.where(_col(d["jitter"] < 0.8), jittered, y)
                y = torch.where(_col(d["gray"] < 0.2), _u8(_gray(y.float())).expand_as(y), y)
                y = torch.where(_col(d["blur"] < 0.5), gaussian_blur(y, d["sigma"] * 1.9 + 0.1), y)
            out[v] = (y.float() * (1 / 255) - self.mean) / self.std
        return out
