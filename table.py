"""The paper's table in one command: every run of a grid of datasets, imbalance factors, rows
(methods) and seeds, on every GPU the machine has, then runs/<name>/table.md, table.json and
table.png.

    python table.py                           # the paper's grid (72 runs of 200 epochs)
    python table.py --name cpu_try --datasets cifar10 --imbs 100 --rows paper audit --syn heldout \\
        -- --width 8 --epochs 3               # flags after -- go to every run
    python table.py --dry-run                 # every command it would run, one a line

The same command again, after a crash or on a new allocation, skips finished runs, resumes killed
ones and recomputes nothing; a failed run is reported in one line and the others go on.
"""
import argparse
import ctypes
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading

import torch
from tqdm import tqdm

import cli
import data
import report
import train

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = {  # name: train.py flags (the rows of the paper's table)
    "baseline": "--syn none --w-con 0",  # the plain long-tailed set, classifier only
    "cls": "--w-con 0",  # the classifier on the filled set
    "paper": "",  # SAU with the paper's relabel rule
    "audit": "--relabel audit",  # SAU with the epoch audit's flags (ours)
}
S = cli.Setting
IS_LIST = (lambda v: len(v) == len(set(v)), "given once each")
CONFIG = {
    "name": S("paper", "the grid's folder: runs/<name>/ holds its runs and its table"),
    "datasets": S(["cifar10", "cifar100"], "datasets, the table's column groups", IS_LIST,
                  choices=tuple(data.DATASETS), type=str, nargs="+"),
    "imbs": S([100.0, 50.0, 10.0], "imbalance factors",
              (lambda v: min(v) >= 1 and IS_LIST[0](v), ">= 1, once each"), type=float, nargs="+"),
    "rows": S(list(ROWS), f"the table's rows, of {', '.join(ROWS)}; each --row joins them", IS_LIST,
              type=str, nargs="+"),
    "row": S([], "NAME=FLAGS: a row of your own (train.py flags), e.g. pos_only='--strategy drop'",
             type=str, nargs="+"),
    "seeds": S([0, 1, 2], "training seeds of every cell",
               (lambda v: min(v) >= 0 and IS_LIST[0](v), ">= 0, once each"), type=int, nargs="+"),
    "syn": S("pool", "the fill of the rows that have one: pool (made by generate.py when "
             "missing, once per dataset, for the grid's largest fill) | heldout (unused real "
             "images, ours)", choices=("pool", "heldout")),
    "gen": S("", "extra generate.py flags for the pools, e.g. '--generator ddpm'"),
    "gpus": S("", "GPU indices to run on, e.g. 0,1 (one run each at a time); empty: every GPU "
              "torch sees, else the CPU, one run at a time",
              (lambda v: not v or all(p.isdigit() for p in v.split(",")),
               "comma-separated GPU indices")),
    "dry_run": S(False, "print every command it would run, one a line (pools first), and exit"),
}


def parse(argv):
    """(the runner's settings, the flags for every run): the two halves of argv around '--'."""
    cut = argv.index("--") if "--" in argv else len(argv)
    cfg = cli.parse_settings(CONFIG, [], __doc__, argv[:cut],
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    rows = dict(ROWS)
    for spec in cfg["row"]:
        name, sep, flags = spec.partition("=")
        if not sep or not name.isidentifier():
            raise cli.SAUError(f"--row {spec}: write NAME=FLAGS, e.g. drop='--strategy drop'")
        rows[name] = flags
    unknown = [r for r in cfg["rows"] if r not in rows]
    if unknown:
        raise cli.SAUError(f"--rows {' '.join(unknown)}: no such row; the rows are "
                           f"{', '.join(rows)} (or add one with --row NAME=FLAGS)")
    # a row of your own joins the table after --rows, without being named there too (a new
    # list: += would grow the default list argparse hands out, the Setting's own)
    cfg["rows"] = cfg["rows"] + [r for r in rows if r not in ROWS and r not in cfg["rows"]]
    cfg["row_flags"] = {r: rows[r] for r in cfg["rows"]}
    extra = argv[cut + 1:]
    for where, flags in [("after --", extra), *((f"row {r}", shlex.split(f))
                                                 for r, f in cfg["row_flags"].items())]:
        refuse_call_flags(where, flags)
    return cfg, extra


def refuse_call_flags(where, flags):
    """A grid run is a plain training run: flags that make a command of their own (--bench,
    --summarize) or that the runner sets (--out, --resume, --stop-after) are refused."""
    for token in flags:
        key = token.split("=", 1)[0][2:].replace("-", "_") if token.startswith("--") else None
        if key in train.CONFIG and train.CONFIG[key].scope == "call":
            raise cli.SAUError(f"{where}: {token.split('=', 1)[0]} makes no training run of the "
                               f"grid (the runner sets the folders and resumes): leave it out")


def plan(cfg, extra):
    """Every run of the grid as (cell, row, seed, its train.py argv, its folder, its settings), in
    table order; checked now, so that a bad combination is one line before anything starts."""
    runs = []
    for dataset in cfg["datasets"]:
        for imb in cfg["imbs"]:
            for row, flags in cfg["row_flags"].items():
                for seed in cfg["seeds"]:
                    argv = ["--dataset", dataset, "--imb", f"{imb:g}", "--syn", cfg["syn"], *extra,
                            *shlex.split(flags), "--seed", str(seed)]
                    try:
                        run_cfg = train.get_config(argv)
                    except cli.SAUError as e:
                        raise cli.SAUError(f"row {row} ({dataset}, --imb {imb:g}): {e}") from None
                    folder = os.path.join("runs", cfg["name"], train.run_name(run_cfg))
                    runs.append((f"{dataset}_imb{imb:g}", row, seed, argv, folder, run_cfg))
    folders = [r[4] for r in runs]
    # two rows with the same settings would share a folder
    if len(set(folders)) < len(folders):
        raise cli.SAUError("two rows of the grid have the same settings: give each row different "
                           "flags")
    return runs


def pools(cfg, runs):
    """generate.py's command for every pool the grid needs and lacks: once per folder, for its
    largest fill."""
    need = {}
    for _, _, _, _, _, c in runs:
        if c["syn"] == "pool":
            folder = data.pool_folder(c)
            need.setdefault(folder, (c, []))[1].append(c["imb"])
    return [(folder, [
        "generate.py", "--dataset", c["dataset"], "--imb", f"{max(imbs):g}", "--data-root",
        c["data_root"], "--pool", folder, *shlex.split(cfg["gen"])
    ]) for folder, (c, imbs) in need.items()
            if not os.path.isfile(os.path.join(folder, "manifest.json"))]


def command(argv, folder):
    """train.py's command for a run: fresh, or --resume where a killed run left its config."""
    started = any(os.path.isfile(os.path.join(folder, f)) for f in ("config.json", "checkpoint.pt"))
    return ["train.py", "--resume", folder] if started else ["train.py", *argv, "--out", folder]


def _die_with_parent():  # a run ends with the runner, however the runner ends (Linux)
    # Ctrl-C stops the runner, which stops the runs in order
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def execute(jobs, devices, desc):
    """Run (script argv, log file) jobs, one at a time per device (None: the CPU), with a progress
    bar; the jobs that failed as (job, why). A job that cannot even start (its log cannot be
    written) fails like one that ends in an error."""
    todo, failed, lock = queue.Queue(), [], threading.Lock()
    for job in jobs:
        todo.put(job)
    bar = tqdm(total=len(jobs), unit="run", desc=desc, dynamic_ncols=True)
    procs = set()

    def run_one(argv, log, device):
        env = dict(os.environ, **({} if device is None else {"CUDA_VISIBLE_DEVICES": str(device)}))
        visible = "" if device is None else f"CUDA_VISIBLE_DEVICES={device} "
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "a") as f:
            f.write(f"$ {visible}python {shlex.join(argv)}\n")
            f.flush()
            start = f.tell()
            p = subprocess.Popen([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]],
                                 env=env, stdout=f, stderr=subprocess.STDOUT,
                                 preexec_fn=_die_with_parent)
            with lock:
                procs.add(p)
            code = p.wait()
        with lock:
            procs.discard(p)
        if not code:
            return None
        with open(log) as f:  # this run's own lines: the log may hold earlier runs' too
            f.seek(start)
            tail = f.read().strip().splitlines()[-1:] or [""]
        return f"exit {code}: {tail[0][:240]} (all of it: {log})"

    def worker(device):
        while True:
            try:
                argv, log = todo.get_nowait()
            except queue.Empty:
                return
            try:
                why = run_one(argv, log, device)
            except OSError as e:
                why = f"could not start ({e.strerror}: {e.filename})"
            with lock:
                if why:
                    failed.append(((argv, log), why))
                    tqdm.write(f"table.py: {shlex.join(argv[:3])}... failed, {why}",
                               file=sys.stderr)
                bar.update(1)
                bar.set_postfix(failed=len(failed))

    threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in devices]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        for p in list(procs):
            # the runs ignore SIGINT (the terminal's goes to them too); a killed run resumes exactly
            p.terminate()
        for p in list(procs):
            p.wait()
        raise KeyboardInterrupt("the finished runs are kept: the same command again resumes the "
                                "rest") from None
    finally:
        bar.close()
    return failed


def devices_of(gpus):
    """(the devices to run on, None for the CPU, and how the start line names them)."""
    seen = torch.cuda.device_count()
    asked = [int(g) for g in gpus.split(",")] if gpus else list(range(seen))
    past = [g for g in asked if g >= seen]
    if past and seen:
        raise cli.SAUError(f"--gpus {gpus}: torch sees {seen} GPU(s), numbered 0-{seen - 1}: "
                           f"pass indices below {seen}")
    if not asked:
        return [None], "the CPU, one at a time"
    names = ", ".join(f"GPU {g}" for g in asked)
    return asked, names + (" (no GPU visible here: the runs train on the CPU)" if past else "")


def main(argv=None):
    cfg, extra = parse(sys.argv[1:] if argv is None else argv)
    runs = plan(cfg, extra)
    needed = pools(cfg, runs)
    pending = [(command(a, folder), os.path.join(folder, "log.txt"))
               for _, _, _, a, folder, _ in runs
               if not os.path.isfile(os.path.join(folder, "final.json"))]
    if cfg["dry_run"]:
        for argv in [a for _, a in needed] + [a for a, _ in pending]:  # the pools first
            print("python " + shlex.join(argv))
        return
    devices, where = devices_of(cfg["gpus"])
    grid = os.path.join("runs", cfg["name"])
    # one runner a grid: a second would run the same runs and write the same logs
    lock = cli.own(grid, "--name", "runner")
    print(f"{grid}: {len(runs)} runs ({len(cfg['datasets'])} datasets x {len(cfg['imbs'])} "
          f"imbalance factors x {len(cfg['rows'])} rows x {len(cfg['seeds'])} seeds), "
          f"{len(runs) - len(pending)} finished, {len(pending)} to run on {where}", flush=True)
    made = execute([(a, os.path.join(folder, "generate_log.txt")) for folder, a in needed],
                   devices[:1], "pools")
    if made:
        (argv, log), _ = made[0]
        raise cli.SAUError(f"the pool {argv[argv.index('--pool') + 1]} could not be made (its "
                           f"log: {log}): no run started")
    failed = execute(pending, devices, "runs")
    report.write_table(grid, cfg, runs)
    lock.close()
    if failed:
        print(f"table.py: {len(failed)} of {len(pending)} runs failed (above); the same command "
              f"again retries them", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run_cli(main)
