"""The paper's table in one command: every run of a grid of datasets, imbalance factors, rows
(methods) and seeds, on every GPU it sees, then runs/<name>/table.md, table.json and table.png.

    python table.py                           # the paper's grid (72 runs of 200 epochs)
    python table.py --name cpu_try --datasets cifar10 --imbs 100 --rows paper audit --syn heldout \\
        -- --width 8 --epochs 3               # flags after -- go to every run
    python table.py --dry-run                 # every command it would run, one a line
    python table.py --slurm grid.sbatch       # a Slurm array of the runs; sbatch it, then again

The same command again skips finished runs and resumes killed ones; a failed run is one line.
"""
import argparse
import os
import shlex
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import cli
import data
import generate
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
    "syn": S("pool", "the rows' fill: pool (generate.py's, made when missing, one shard a GPU) | "
             "heldout (unused real images, ours)", choices=("pool", "heldout")),
    "gen": S("", "extra generate.py flags for the pools, e.g. '--generator ddpm'"),
    "gpus": S("", "GPUs to run on, one run each at a time, e.g. 0,1 (as torch numbers them); "
              "empty: every GPU torch sees, else the CPU", (lambda v: not v or all(
                  p.isdigit() for p in v.split(",")), "comma-separated GPU indices")),
    "dry_run": S(False, "print every command it would run, one a line (pools first), and exit"),
    "slurm": S("", "on a cluster: fetch the data, check the pools, write the table of the runs "
               "finished and FILE, an sbatch array of one task a run not finished; trains nothing"),
    "task": S("", "one run of the grid in this folder, its train.py flags after --: nothing if "
              "finished, else trained or resumed (the --slurm script's tasks)"),
}
IGNORED = [(k, lambda c: bool(c["slurm"]), "with --slurm FILE") for k in ("dry_run", "gpus")]


class Job(NamedTuple):  # one training run of the grid
    cell: str  # dataset and imbalance, the table's column
    row: str
    seed: int
    argv: list  # its train.py flags
    folder: str
    cfg: dict  # its settings, as train.py parses them


def parse(argv):
    """(the runner's settings, the flags for every run): argv before and after '--'."""
    cut = argv.index("--") if "--" in argv else len(argv)
    cfg = cli.parse_settings(CONFIG, IGNORED, __doc__, argv[:cut],
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
    # a row of your own joins the table after --rows (a new list: += would grow the default)
    cfg["rows"] = cfg["rows"] + [r for r in rows if r not in ROWS and r not in cfg["rows"]]
    cfg["row_flags"] = {r: rows[r] for r in cfg["rows"]}
    extra = argv[cut + 1:]
    for where, flags in [("after --", extra), *((f"row {r}", shlex.split(f))
                                                 for r, f in cfg["row_flags"].items())]:
        refuse_call_flags(where, flags)
    return cfg, extra


def refuse_call_flags(where, flags):
    """A grid run is a plain training run: flags of another command or the runner's are refused."""
    for token in flags:
        key = token.split("=", 1)[0][2:].replace("-", "_") if token.startswith("--") else None
        if key in train.CONFIG and train.CONFIG[key].scope == "call":
            raise cli.SAUError(f"{where}: {token.split('=', 1)[0]} makes no training run of the "
                               f"grid (the runner sets the folders and resumes): leave it out")


def plan(cfg, extra):
    """Every run of the grid, in table order, checked before anything starts."""
    jobs = []
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
                    jobs.append(Job(f"{dataset}_imb{imb:g}", row, seed, argv, folder, run_cfg))
    if len({j.folder for j in jobs}) < len(jobs):
        raise cli.SAUError("two rows of the grid have the same settings: give each row different "
                           "flags")
    return jobs


def pools(cfg, jobs, shards):
    """generate.py's commands for every pool the grid lacks, for its largest fill: one shard a
    device for a downloaded pipeline (one process for a DDPM or a language model's prompts)."""
    need = {}
    for c in (j.cfg for j in jobs if j.cfg["syn"] == "pool"):
        need.setdefault(data.pool_folder(c), (c, []))[1].append(c["imb"])
    gen = generate.parse_args(shlex.split(cfg["gen"]))
    shards = shards if gen["generator"] == "text2image" and not gen["prompt_model"] else 1
    return [(folder, ["generate.py", "--dataset", c["dataset"], "--imb", f"{max(imbs):g}",
                      "--data-root", c["data_root"], "--pool", folder, *shlex.split(cfg["gen"]),
                      *(["--shard", f"{i}/{shards}"] if shards > 1 else [])])
            for folder, (c, imbs) in need.items()
            if not os.path.isfile(os.path.join(folder, "manifest.json"))
            for i in range(shards)]


def finished(folder):
    return os.path.isfile(os.path.join(folder, "final.json"))


def command(argv, folder):
    """train.py's command for a run: fresh, or --resume where a killed run left its config."""
    started = any(os.path.isfile(os.path.join(folder, f)) for f in ("config.json", "checkpoint.pt"))
    return ["train.py", "--resume", folder] if started else ["train.py", *argv, "--out", folder]


def execute(jobs, devices, desc):
    """Run (script argv, log file) jobs, one at a time a device (a CUDA_VISIBLE_DEVICES value; None:
    the CPU); the jobs that failed, as (job, why)."""
    todo, free, running, failed = list(jobs), list(devices), {}, []
    bar = tqdm(total=len(jobs), unit="run", desc=desc, dynamic_ncols=True)

    def done(job, why):
        if why:
            failed.append((job, why))
            tqdm.write(f"table.py: {shlex.join(job[0][:3])}... failed, {why}", file=sys.stderr)
        bar.update(1)
        bar.set_postfix(failed=len(failed))

    try:
        while todo or running:
            while todo and free:
                job, device = todo.pop(0), free[0]
                argv, log = job
                env = dict(os.environ)
                if device is not None:
                    env["CUDA_VISIBLE_DEVICES"] = device
                try:
                    os.makedirs(os.path.dirname(log), exist_ok=True)
                    f = open(log, "a")
                    visible = "" if device is None else f"CUDA_VISIBLE_DEVICES={device} "
                    f.write(f"$ {visible}python {shlex.join(argv)}\n")
                    f.flush()
                    p = subprocess.Popen([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]],
                                         env=env, stdout=f, stderr=subprocess.STDOUT,
                                         preexec_fn=cli.ignore_sigint)
                except OSError as e:
                    done(job, f"could not start ({e.strerror}: {e.filename})")
                    continue
                running[p] = (job, free.pop(0), f, f.tell())
            time.sleep(0.1)
            for p in [p for p in running if p.poll() is not None]:
                job, device, f, start = running.pop(p)
                free.append(device)
                f.close()
                why = None
                if p.returncode:
                    with open(job[1]) as log:  # this run's own lines: the log may hold others'
                        log.seek(start)
                        tail = log.read().strip().splitlines()[-1:] or [""]
                    why = f"exit {p.returncode}: {tail[0][:240]} (all of it: {job[1]})"
                done(job, why)
    except KeyboardInterrupt:
        for p in running:
            p.terminate()  # a killed run resumes exactly
        for p in running:
            p.wait()
        raise KeyboardInterrupt("the finished runs are kept: the same command again resumes the "
                                "rest") from None
    finally:
        bar.close()
    return failed


def devices_of(gpus):
    """(each device's CUDA_VISIBLE_DEVICES value, None: the CPU; their names). GPU k is the k-th
    this process sees: of its own CUDA_VISIBLE_DEVICES where set (Slurm, MIG or UUID values)."""
    seen = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",")[:seen] if visible is not None else [str(i) for i in range(seen)]
    asked = [int(g) for g in gpus.split(",")] if gpus else list(range(seen))
    past = [g for g in asked if g >= seen]
    if past:
        raise cli.SAUError(f"--gpus {gpus}: torch sees {seen} GPU(s) here" + (
            f", numbered 0-{seen - 1}" if seen else
            "; without --gpus the runs train on the CPU, one at a time"))
    if not asked:
        return [None], "the CPU, one at a time"
    return [ids[g] for g in asked], ", ".join(f"GPU {g} ({ids[g]})" for g in asked)


def main(argv=None):
    cfg, extra = parse(sys.argv[1:] if argv is None else argv)
    if cfg["task"]:
        return run_task(cfg["task"], extra)
    jobs = plan(cfg, extra)
    if cfg["slurm"]:
        return slurm(cfg, jobs)
    # --dry-run: the commands for another machine, its pools in one process each
    devices, where = ([None], "") if cfg["dry_run"] else devices_of(cfg["gpus"])
    needed = pools(cfg, jobs, len(devices))
    pending = [(command(j.argv, j.folder), os.path.join(j.folder, "log.txt"))
               for j in jobs if not finished(j.folder)]
    if cfg["dry_run"]:
        for argv in [a for _, a in needed] + [a for a, _ in pending]:  # the pools first
            print("python " + shlex.join(argv))
        return
    fetch_data(jobs)
    grid = os.path.join("runs", cfg["name"])
    # one runner a grid: a second would run the same runs and write the same logs
    lock = cli.own(grid, "--name", "runner")
    print(f"{grid}: {len(jobs)} runs ({len(cfg['datasets'])} datasets x {len(cfg['imbs'])} "
          f"imbalance factors x {len(cfg['rows'])} rows x {len(cfg['seeds'])} seeds), "
          f"{len(jobs) - len(pending)} finished, {len(pending)} to run on {where}", flush=True)
    made = execute([(a, os.path.join(folder, "generate_log.txt")) for folder, a in needed],
                   devices, "pools")
    if made:
        (argv, log), _ = made[0]
        raise cli.SAUError(f"the pool {argv[argv.index('--pool') + 1]} could not be made (its "
                           f"log: {log}): no run started")
    failed = execute(pending, devices, "runs")
    write_table(grid, cfg, jobs)
    lock.close()
    if failed:
        print(f"table.py: {len(failed)} of {len(pending)} runs failed (above); the same command "
              f"again retries them", file=sys.stderr)
        sys.exit(1)


def fetch_data(jobs):  # CIFAR for every run, fetched here, one download at a time
    for dataset, root in {(j.cfg["dataset"], j.cfg["data_root"]) for j in jobs}:
        data.cifar_folder(dataset, root)


# ---------------------------------------------------------------- the grid as a Slurm array

SBATCH = """#!/usr/bin/env bash
# The grid {grid} as a Slurm array, one task a run not finished when this file was written by
#   python table.py ... --slurm {file}
# Submit it with your cluster's options: sbatch --partition=P --time=T {file}
# A task whose folder holds a run continues it (requeued, preempted, out of time: submit again);
# a finished run's task does nothing. Afterwards the same table.py command writes the table.
#SBATCH --job-name=sau-{name}
#SBATCH --array=0-{last}
#SBATCH --gres=gpu:1
#SBATCH --requeue
#SBATCH --output={logs}/%A_%a.out
set -euo pipefail
cd {here}
case "${{SLURM_ARRAY_TASK_ID:?not a Slurm array task: submit this file with sbatch}}" in
{cases}
  *) echo "no task $SLURM_ARRAY_TASK_ID in this array" >&2; exit 2 ;;
esac
exec {python} {table} --task "${{run[0]}}" -- "${{run[@]:1}}"
"""


def slurm(cfg, jobs):
    """--slurm FILE: the data fetched and the pools checked here (compute nodes are often
    offline), the table of the runs finished so far, and FILE: an sbatch array, one task a run
    not finished, each in its own folder. Nothing trains here."""
    fetch_data(jobs)
    needed = pools(cfg, jobs, 1)
    if needed:
        print("\n".join("python " + shlex.join(argv) for _, argv in needed))
        raise cli.SAUError(f"{len(needed)} pool(s) the runs need are missing: make them with the "
                           f"command(s) above first (a GPU job each, or --shard i/N in an array "
                           f"of its own), then run this again")
    grid, path = os.path.join("runs", cfg["name"]), cfg["slurm"]
    todo = [j for j in jobs if not finished(j.folder)]
    if len(todo) < len(jobs):
        write_table(grid, cfg, jobs)
    if not todo:
        print(f"{grid}: all {len(jobs)} runs finished: no array to submit")
        return
    logs = os.path.abspath(cli.writable_folder(os.path.join(grid, "slurm"), "--name"))
    cases = "\n".join(f"  {k}) run=({shlex.join([j.folder, *j.argv])}) ;;"
                      for k, j in enumerate(todo))
    cli.write_atomic(path, SBATCH.format(
        grid=grid, file=path, name=cfg["name"], last=len(todo) - 1, logs=logs,
        here=shlex.quote(os.getcwd()), cases=cases, python=shlex.quote(sys.executable),
        table=shlex.quote(os.path.join(HERE, "table.py"))))
    os.chmod(path, 0o755)
    print(f"{grid}: {len(jobs) - len(todo)} of {len(jobs)} runs finished; {path}: an array of the "
          f"other {len(todo)}, one task a run, its logs in {logs}:\n"
          + "".join(f"  task {k}: {j.folder}\n" for k, j in enumerate(todo))
          + f"submit it with your options (sbatch --partition=P --time=T {path}); then this "
          f"command again writes the table")


def run_task(folder, argv):
    """--task: one run of a grid alone (a Slurm array task): nothing if it finished, else its
    train.py command (table.command: fresh, or resumed), in this process."""
    if finished(folder):
        print(f"{folder}: finished, nothing to do")
        return
    argv = command(argv, folder)
    print("python " + shlex.join(argv), flush=True)
    train.main(argv[1:])


# ---------------------------------------------------------------- the table


def write_table(folder, cfg, jobs, keys=("top1", *data.GROUPS)):
    """table.md, table.json and table.png: each cell the final-epoch accuracy, mean ± std over
    the seeds that finished (missing ones named)."""
    cells = list(dict.fromkeys(j.cell for j in jobs))
    table = {row: {cell: {"seeds": [], "missing_seeds": [], "runs": []} for cell in cells}
             for row in cfg["rows"]}
    finals = {}
    for j in jobs:
        entry, final = table[j.row][j.cell], report.final_metrics(j.folder)
        entry["missing_seeds" if final is None else "seeds"].append(j.seed)
        if final is not None:
            entry["runs"].append(j.folder)
            finals.setdefault((j.row, j.cell), []).append(final)
    for row, cells_of_row in table.items():
        for cell, entry in cells_of_row.items():
            entry.update(report.spreads(finals.get((row, cell), []), keys))

    def shown(entry):
        t, missing = entry["top1"], len(entry["missing_seeds"])
        if t is None:
            return "missing"
        partial = f" ({t['runs']} of {t['runs'] + missing} seeds)" if missing else ""
        return report.shown_spread(t) + partial

    name = lambda cell: (cell.replace("_imb", " imb ").replace("cifar10 ", "CIFAR-10-LT ")
                         .replace("cifar100 ", "CIFAR-100-LT "))
    seeds = ", ".join(map(str, cfg["seeds"]))
    lines = [
        f"Final-epoch top-1 (%), mean ± std over seeds {seeds}; rows: {', '.join(cfg['rows'])}.",
        "", "| method | " + " | ".join(map(name, cells)) + " |", "|---" * (len(cells) + 1) + "|"]
    lines += [f"| {row} `{cfg['row_flags'][row] or 'the defaults'}` | "
              + " | ".join(shown(table[row][c]) for c in cells) + " |" for row in cfg["rows"]]
    grid = {k: cfg[k] for k in ("name", "datasets", "imbs", "rows", "seeds", "syn", "row_flags")}
    report.write_summary(os.path.join(folder, "table"), lines, {"grid": grid, "table": table})
    plt = report.pyplot()
    mean = np.array([[np.nan if table[r][c]["top1"] is None else table[r][c]["top1"]["mean"]
                      for c in cells] for r in cfg["rows"]])
    fig, ax = plt.subplots(figsize=(max(5.5, 2 + 1.6 * len(cells)), 1.2 + 0.6 * len(cfg["rows"])))
    seen = np.isfinite(mean).any()
    ax.imshow(mean, cmap="Greens", aspect="auto", vmin=np.nanmin(mean) - 5 if seen else 0,
              vmax=np.nanmax(mean) + 10 if seen else 100)
    for i, r in enumerate(cfg["rows"]):
        for j, c in enumerate(cells):
            ax.text(j, i, shown(table[r][c]).replace(" (", "\n("), ha="center", va="center",
                    fontsize=8)
    ax.set_xticks(range(len(cells)), [name(c).replace(" imb", "\nimb") for c in cells], fontsize=8)
    ax.set_yticks(range(len(cfg["rows"])), cfg["rows"])
    ax.set_title(f"final-epoch top-1 (%), mean ± std over seeds {seeds}", fontsize=9)
    report.save_figure(fig, os.path.join(folder, "table.png"))
    print("\n".join(lines) + f"\nwritten: {folder}/table.md, table.json, table.png")
    return table


if __name__ == "__main__":
    cli.run_cli(main)
