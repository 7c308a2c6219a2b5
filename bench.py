"""train.py --bench: the whole step, its data path alone and the forward-only passes timed with a
run's flags, on the run's device, with nothing written."""
import json
import math
import time
import warnings

import torch

import cli


def timed(batches, work, n, warmup, device, begin=lambda: None):
    """(seconds a batch over n batches, seconds of the warm-up ones before: compilation)."""
    it, t0 = iter(batches), time.perf_counter()
    for i in range(warmup + n):
        if i == warmup:
            cli.synchronize(device)
            begin()
            t = time.perf_counter()
        work(next(it))
    cli.synchronize(device)
    return (time.perf_counter() - t) / n, t - t0


def bench(cfg, run, step, data, forward, warmup=3):
    """--bench: the whole step, its data path alone and a forward-only pass (prototypes, test set)
    timed with the run's flags, peak memory and, on CUDA, the timed steps' host syncs; printed and
    returned, nothing written. step, data, forward: (a function of no argument that gives the
    batches, the work on one batch), from train.benchmark."""
    warmup += 7 * (cfg["compile"] == "on")  # compilation, and a recompilation for the eval graph
    n, device, cuda = cfg["bench"], run.device, run.device.type == "cuda"
    # CUDA: every host sync inside a timed step warns once (not the warm-up's copies)
    with warnings.catch_warnings(record=True) as syncs:
        warnings.simplefilter("always")
        try:
            step_s, warmup_s = timed(step[0](), step[1], n, warmup, device, begin=lambda: cuda and
                                     torch.cuda.set_sync_debug_mode("warn"))
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in syncs) if cuda else None
    data_s = timed(data[0](), data[1], n, warmup, device)[0]
    run.model.eval()
    with torch.no_grad():
        proto_s = timed(forward[0](), forward[1], n, warmup, device)[0]
    bs, steps = cfg["batch_size"], math.ceil(len(run.mixed) / cfg["batch_size"])
    # per epoch: the steps, the prototypes (real images, two views, batches of 256) and the test
    # set (one view, about half the cost)
    passes = math.ceil(sum(run.mixed.n_real) / 256) * (cfg["w_con"] > 0) + len(run.test[1]) / 512
    epoch_s = steps * step_s + passes * proto_s
    name, peak = cli.device_figures(device)
    res = {"device": name, "amp": "bf16" if run.amp else "off",
           "width": cfg["width"], "batch_size": bs, "channels_last": cfg["channels_last"],
           "compile": cfg["compile"], "steps_timed": n, "step_images_per_s": bs / step_s,
           "data_images_per_s": bs / data_s, "data_fraction": data_s / step_s,
           "forward_images_per_s": 2 * 256 / proto_s, "epoch_s": epoch_s,
           "run_s": epoch_s * cfg["epochs"], "peak": peak, "host_syncs_in_timed_steps": syncs,
           "warmup_s": warmup_s}
    print(f"bench ({name}; amp {res['amp']}, channels_last "
          f"{cfg['channels_last']}, compile {cfg['compile']}, width {cfg['width']}, batch {bs}; "
          f"{n} steps after {warmup} warm-up, {warmup_s:.1f} s with any compilation):\n"
          f"  whole step {bs / step_s:.1f} images/s ({1000 * step_s:.1f} ms), data path alone "
          f"{bs / data_s:.1f} ({100 * data_s / step_s:.1f}% of a step), prototype/test passes "
          f"{2 * 256 / proto_s:.1f}\n  peak memory {peak}; host syncs in the timed steps: "
          f"{'-' if syncs is None else syncs}; projected: {epoch_s:.1f} s per epoch, "
          f"{cfg['epochs']} epochs {epoch_s * cfg['epochs'] / 60:.1f} min")
    print("bench_json " + json.dumps(res))
    return res
