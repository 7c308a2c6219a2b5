"""What a person reads of a run: the epoch line, the detector figures, final.json, the pictures
(redrawn from the checkpoint) and --summarize's table."""
import json
import os

import numpy as np
from tqdm import tqdm

import cli
import data

# ------------------------------------------------ the figures of a detector of bad synthetic images


def detector(flag, mixed):
    """Flags [N] bool as a detector of bad synthetic images: the share of synthetic samples flagged,
    overall and per class, and with planted images recall, false-flag rate and precision."""
    syn, noisy, y = mixed.is_syn, mixed.is_noisy, mixed.labels
    share = lambda of, m: float(of[m].mean()) if m.any() else None
    per_class = [share(flag, syn & (y == c)) for c in range(len(mixed.classes))]
    fig = {"suspect_frac": share(flag, syn), "suspect_frac_per_class": per_class}
    if noisy.any():
        fig.update(recall=share(flag, noisy), false_flag_rate=share(flag, syn & ~noisy),
                   precision=share(noisy, syn & flag))
    return fig


# ---------------------------------------------------------------- the epoch line and final.json


def print_epoch(m, epochs):
    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"
    line = (f"epoch {m['epoch']}/{epochs}  loss {m['loss']:.3f} (cls {m['loss_cls']:.3f} con "
            f"{m['loss_con']:.3f})  lr {m['lr']:.4g}  top1 {m['top1']:.2f}  many/med/few "
            + "/".join(fmt(m[g], 1) for g in data.GROUPS))
    if m["suspect_frac"] is not None:
        line += f"  suspects {fmt(m['suspect_frac'])}"
        if "recall" in m:
            line += (f" (planted: recall {fmt(m['recall'])}, false flags "
                     f"{fmt(m['false_flag_rate'])}, precision {fmt(m['precision'])})")
    line += f"  {m['seconds']:.0f}s  {m['images_per_s']:.0f} img/s"
    if "audit" in m:  # ours: each score's flags, then the flags the step used
        a = m["audit"]
        line += "\n  audit"
        for k in (k for k in a if "suspect_frac" in a[k]):
            line += f"  {k}: flags {fmt(a[k]['suspect_frac'])}"
            if "recall" in a[k]:
                line += (f" (recall {fmt(a[k]['recall'])}, precision {fmt(a[k]['precision'])}, "
                         f"AUC {fmt(a[k]['auc'])})")
        if a["flags"]["auc"] is not None:
            line += f"  step's flags AUC {fmt(a['flags']['auc'])}"
        line += f"  {m['audit_s']:.0f}s"
    tqdm.write(line)


def write_final(out, cfg, metrics, ev, mixed, flagged, scores):
    best = max(metrics, key=lambda r: r["top1"])
    last = metrics[-1]
    detector_keys = ("suspect_frac", "recall", "false_flag_rate", "precision")
    final = {
        "final_epoch": {k: ev[k] for k in ("top1", "top5", *data.GROUPS, "per_class")},
        "epochs": cfg["epochs"], "seed": cfg["seed"], "data_seed": cfg["data_seed"],
        "best_over_epochs_selected_on_test_set": {"top1": best["top1"], "epoch": best["epoch"]},
        "seconds_per_epoch": sum(r["seconds"] for r in metrics) / len(metrics),
        "images_per_s": sum(r["images_per_s"] for r in metrics) / len(metrics),
        "detector_last_epoch": {k: last.get(k) for k in detector_keys if k in last},
        "audit_last_epoch": {k: v for k, v in last.get("audit", {}).items() if k != "per_class"},
    }
    plot_run(out, metrics, ev)
    if cfg["w_con"] > 0 and mixed.is_syn.any():
        plot_suspects(out, mixed, flagged, cfg["epochs"])
    if scores is not None:
        plot_audit(out, mixed, scores.numpy(), cfg["epochs"])
    cli.write_atomic(os.path.join(out, "final.json"), json.dumps(final, indent=1))
    f = final["final_epoch"]
    groups = "/".join("-" if f[g] is None else f"{f[g]:.2f}" for g in data.GROUPS)
    print(f"final (epoch {cfg['epochs']}): top1 {f['top1']:.2f}  top5 {f['top5']:.2f}  "
          f"many/medium/few {groups}  (best over epochs, selected on the test set: "
          f"{best['top1']:.2f} at epoch {best['epoch']})  -> {out}")


# ---------------------------------------------------------------- pictures


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    fig.tight_layout()
    cli.write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    pyplot().close(fig)


def plot_run(out, metrics, ev):  # curves.png, per_class.png and confusion.png
    plt, ep = pyplot(), [r["epoch"] for r in metrics]
    panels = [("loss", "loss_cls", "loss_con"), ("lr",), ("top1", *data.GROUPS),
              ("suspect_frac", "recall", "false_flag_rate", "precision"),
              ("auc_p", "auc_margin", "auc_both", "auc_flags")]
    titles = ["training loss", "learning rate", "test accuracy (%)",
              "the step's suspects among synthetic samples", "audit AUC, planted vs clean"]
    shown = [i for i, keys in enumerate(panels) if any(r.get(keys[0]) is not None for r in metrics)]
    fig, ax = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4))
    for a, keys, title in zip(ax, [panels[i] for i in shown], [titles[i] for i in shown]):
        for k in keys:  # many/medium/few: the groups that have classes
            if any(r.get(k) is not None for r in metrics):
                a.plot(ep, [np.nan if r.get(k) is None else r[k] for r in metrics], ".-", label=k)
        a.set(title=title, xlabel="epoch")
        a.set_xticks(ep) if len(ep) <= 20 else None
        a.legend() if len(keys) > 1 and a.get_legend_handles_labels()[0] else None
    save_figure(fig, os.path.join(out, "curves.png"))

    c, small = np.arange(len(ev["per_class"])), len(ev["per_class"]) <= 20
    colors = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    fig, ax = plt.subplots(figsize=(max(8, len(c) * 0.12 + 4), 4))
    ax.bar(c, ev["per_class"], color=[colors[data.shot_group(n)] for n in ev["n_real"]])
    ax.set(xlabel="class (head to tail)", ylabel="test accuracy (%)", ylim=(0, 100),
           title="per-class accuracy; bars coloured many / medium / few; lines: train images")
    ax.set_xticks(c, ev["classes"], rotation=45, ha="right") if small else None
    tw = ax.twinx()
    tw.plot(c, ev["n_real"], "k.-", label="real")
    tw.plot(c, ev["n_syn"], "g.--", label="synthetic")
    tw.set(ylabel="train images", yscale="symlog")
    tw.legend(loc="upper right")
    save_figure(fig, os.path.join(out, "per_class.png"))

    cm = np.asarray(ev["confusion"], float)
    fig, ax = plt.subplots(figsize=(7, 6))
    fig.colorbar(ax.imshow(cm / cm.sum(1, keepdims=True).clip(min=1), cmap="Blues", vmin=0, vmax=1))
    ax.set(xlabel="predicted", ylabel="true", title="confusion (rows normalised)")
    if small:
        ax.set_xticks(c, ev["classes"], rotation=45, ha="right")
        ax.set_yticks(c, ev["classes"])
    save_figure(fig, os.path.join(out, "confusion.png"))


def plot_audit(out, mixed, scores, epochs):
    """audit.png: the last audit's scores of real, clean synthetic and planted samples."""
    plt, syn, noisy = pyplot(), mixed.is_syn, mixed.is_noisy
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for a, s, title in zip(ax, scores.T,
                           ("log p(label), classifier, plain image", "prototype margin")):
        bins = np.linspace(np.quantile(s, 0.005), s.max(), 60)
        for name, m in [("real", ~syn), ("synthetic, clean", syn & ~noisy),
                        ("synthetic, planted", noisy)]:
            if m.any():
                a.hist(s[m].clip(bins[0]), bins, density=True, histtype="step", lw=1.5,
                       label=f"{name} ({m.sum()})")
        a.set(title=title, xlabel="score (lower: less like its class)", ylabel="density")
        a.legend()
    fig.suptitle(f"epoch audit after epoch {epochs} (the lowest 0.5% piled into the first bin)",
                 fontsize=10)
    save_figure(fig, os.path.join(out, "audit.png"))


def plot_suspects(out, mixed, flagged, epochs, per_side=8):
    """suspects.png: per class (every tenth beyond 20), the synthetic images taken as suspects in
    the most epochs and in the fewest, with their counts; planted ones outlined in red."""
    plt, num_classes = pyplot(), len(mixed.classes)
    shown = [c for c in range(num_classes) if num_classes <= 20 or c % 10 == 0]
    m, text = 3, 11  # margin for the outline, band below each image for its count
    s, cols = 32 + 2 * m, 2 * per_side + 1  # a blank column between the two sides
    mosaic = np.full((len(shown) * (s + text), cols * s, 3), 255, np.uint8)
    fig, ax = plt.subplots(figsize=(cols * s / 50, len(shown) * (s + text) / 50 + 0.9))
    order = np.random.default_rng(0).permutation(len(mixed))
    for r, c in enumerate(shown):
        syn, y0 = order[mixed.is_syn[order] & (mixed.labels[order] == c)], r * (s + text)
        if not len(syn):
            ax.text(cols * s / 2, y0 + s / 2, "no synthetic images", ha="center", va="center",
                    fontsize=8)
        most = syn[np.argsort(-flagged[syn], kind="stable")[:per_side]]
        fewest = syn[np.argsort(flagged[syn], kind="stable")[:per_side]]
        for col, i in [*enumerate(most), *((per_side + 1 + k, i) for k, i in enumerate(fewest))]:
            x0 = col * s
            mosaic[y0 + m:y0 + m + 32, x0 + m:x0 + m + 32] = mixed.images[i]
            if mixed.is_noisy[i]:
                ax.add_patch(plt.Rectangle((x0 + 0.5, y0 + 0.5), s - 2, s - 2, fill=False,
                                           edgecolor="red", lw=1.5))
            ax.text(x0 + s / 2, y0 + s + text / 2, f"{flagged[i]}/{epochs}", ha="center",
                    va="center", fontsize=6)
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([r * (s + text) + s / 2 for r in range(len(shown))],
                  [mixed.classes[c] for c in shown])
    ax.set_xticks([per_side * s / 2, (per_side + 1 + per_side / 2) * s],
                  ["taken as suspect in the most epochs", "in the fewest"])
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    fig.suptitle(f"synthetic images per class, each with the epochs (of {epochs}) it was taken as "
                 f"a suspect; red: a planted wrong-class image", fontsize=9)
    for side in ax.spines.values():
        side.set_visible(False)
    save_figure(fig, os.path.join(out, "suspects.png"))


# ------------------------------------------ finished runs over seeds: --summarize and table.py

METRICS = ("top1", "top5", *data.GROUPS)  # the final-epoch figures of a summary


def final_metrics(folder):
    """A finished run's final-epoch metrics (its final.json), None while it is not finished."""
    path = os.path.join(folder, "final.json")
    return cli.read_json(path)["final_epoch"] if os.path.isfile(path) else None


def spreads(finals, keys=METRICS):
    """{metric: spread} over finished runs' final-epoch metrics."""
    return {k: spread([f[k] for f in finals]) for k in keys}


def write_summary(path, lines, summary):
    """path.md (a table's lines) and path.json (its numbers), each in one rename."""
    cli.write_atomic(path + ".md", "\n".join(lines) + "\n")
    cli.write_atomic(path + ".json", json.dumps(summary, indent=1))


def spread(values):
    """{"mean", "std" (None for one run), "runs"} over the values not None, or None."""
    v = np.array([x for x in values if x is not None], float)
    if not len(v):
        return None
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None,
            "runs": len(v)}


def shown_spread(t):
    if t["std"] is None:
        return f"{t['mean']:.2f} (n = 1)"
    return f"{t['mean']:.2f} ± {t['std']:.2f}"


def summarize(settings, dirs, out=""):
    """Mean and standard deviation of the final metrics over runs that differ only in --seed."""
    runs = []
    for d in dirs:
        if not os.path.isfile(os.path.join(d, "config.json")):
            raise cli.SAUError(f"{d} is not a run folder (no config.json)")
        final = final_metrics(d)
        if final is None:
            raise cli.SAUError(f"{d} has no final.json: finish the run with --resume {d}")
        runs.append((d, cli.read_json(os.path.join(d, "config.json")), final))
    ref = runs[0][1]
    for d, c, _ in runs[1:]:
        diff = cli.config_diff(ref, c, settings, ignore={"seed"})
        if diff:
            raise cli.SAUError(f"{d} differs from {runs[0][0]} in "
                               f"{', '.join(map(cli.flag, diff))}: summarize runs that differ "
                               f"only in --seed")
    table = {k: t for k, t in spreads([f for _, _, f in runs]).items() if t}
    defaults = {k: s.default for k, s in settings.items()}
    name = cli.run_name(settings, {**defaults, **ref}, seed=False)
    seeds = ", ".join(str(c["seed"]) for _, c, _ in runs)
    lines = [f"{name}: final-epoch test accuracy (%), {ref['epochs']} epochs, seeds {seeds}, "
             f"mean ± std over {len(runs)} runs",
             "| " + " | ".join(table) + " |", "|" + "---|" * len(table),
             "| " + " | ".join(map(shown_spread, table.values())) + " |"]
    print("\n".join(lines))
    path = out or os.path.join("runs", f"summary_{name}")
    cli.writable_folder(os.path.dirname(path) or ".", "--out")
    write_summary(path, lines, {"runs": dirs, "config": ref, "final_epoch": table})
    print(f"written: {path}.md, {path}.json")
