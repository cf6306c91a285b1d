"""Many games and seeds: one train.py run per (game, seed), on a Slurm cluster or on this machine, through submitit,
then Table 1's aggregate over them (evaluate.py --aggregate).

    python sweep.py --games atari100k --seeds 5 --out sweeps/table1 --executor slurm --partition gpu   # Table 1
    python sweep.py --games Pong,Breakout --seeds 2 --out sweeps/two --preset tiny                    # here, 1 at a time
    python sweep.py --games atari100k --seeds 5 --out sweeps/table1 --dry_run --bench bench.json      # the plan
    python sweep.py --status sweeps/table1                                                            # each run's state

Every flag of train.py sets the runs' config (--preset tiny, --epochs 100, --tokenizer.vocab_size 256...), except
--game, --seed and --out, which the sweep sets per run. --executor slurm submits one job array: each task holds one
GPU and trains runs_per_gpu runs side by side on it (Appendix G: two per A100). --executor local trains the runs on
this machine, --parallel at a time, and waits for them. Either way the sweep ends with the aggregate (on Slurm, a
job that waits for the array).

A stopped run loses nothing. Before the time limit Slurm sends USR2: SweepJob.checkpoint stops each train.py with
SIGTERM, which keeps the last complete epoch (the one in progress is dropped and run again), and submitit requeues
the same call, which resumes each run from its checkpoint (train.py --resume). A preemption's SIGTERM reaches
train.py directly, with the same effect; with --requeue (set here), Slurm requeues the task. Starting the sweep
again with the same command skips the finished runs (final_eval.json present) and resumes the others: that is how a
sweep is resumed, on Slurm or here.

The sweep directory:
    sweep.json              the plan: the runs' config and every (game, seed) run; the last job of each run
    runs/<game>-s<seed>/    train.py's run directories
    logs/<run>.log          train.py's output, every start appended; <run>.alive is touched every 30 s while the
                            run's train.py lives, <run>.failed holds the exit code of a failed one
    submitit/               submitit's pickles, sbatch scripts and job logs
    aggregate.txt, aggregate.json, per_run_scores.json    evaluate.py --aggregate (the last in IRIS.json's layout)
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import submitit

REPO = Path(__file__).resolve().parent
SWEEP_FILE = "sweep.json"  # evaluate.py reads its "runs" too
# train.py's file names (train.FINAL_EVAL, train.LOCK_FILE), written here rather than imported: a job and --status
# would otherwise import torch for two strings.
FINAL_EVAL = "final_eval.json"  # a finished run
LOCK_FILE = ".lock"  # flock-ed by a run's train.py for its whole life
STATES = ("pending", "running", "done", "failed")
HEARTBEAT_SECONDS = 30.0  # a job touches logs/<run>.alive this often while the run's train.py lives
STALE_SECONDS = 3 * HEARTBEAT_SECONDS  # an older .alive: its job is gone (killed, node lost)
POLL_SECONDS = 0.5  # how often a job looks at its train.py processes
STOP_WAIT_SECONDS = 60.0  # train.py stops within seconds of a SIGTERM; past this it is killed
STOP_EXIT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # train.py stopped: its last complete epoch is saved
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # submitit's local jobs time out (2 min by default); a sweep here has no limit
PER_RUN_KEYS = ("game", "seed", "out")  # IRISConfig fields that the sweep sets for each run


@dataclass
class SweepConfig:
    """Where and how the runs are trained. Their hyperparameters are an IRISConfig, set by train.py's flags."""

    games: str = "atari100k"  # comma list of games; atari100k: the 26 games of Table 1 (env.ATARI_100K_GAMES)
    seeds: int = 5  # seeds 0 .. seeds - 1 of every game (Table 1: 5 runs per game)
    out: str = ""  # the sweep directory
    executor: str = "local"  # "slurm": a job array; "local": this machine
    runs_per_gpu: int = 2  # runs sharing one GPU (Appendix G: two environments per A100)
    parallel: int = 0  # local: runs at a time; 0: runs_per_gpu per GPU, or 1 without one
    # Slurm: sbatch's options for each task of the array
    partition: str = ""  # empty: the cluster's default
    account: str = ""
    qos: str = ""
    constraint: str = ""  # node features, e.g. a100
    time_min: int = 24 * 60  # a task's time limit; when it is reached the task is requeued and its runs resume
    gpus_per_task: int = 1  # a task trains runs_per_gpu x gpus_per_task runs
    cpus_per_task: int = 8  # a run steps one training env, and eval_envs test envs during evaluations
    mem_gb: int = 0  # memory per task; 0: the partition's default
    array_parallelism: int = 256  # tasks of the array running at once
    signal_delay_s: int = 120  # USR2 comes this long before the time limit: the runs stop and save within it
    max_timeouts: int = 20  # requeues after a time limit (submitit's max_num_timeout; preemptions do not count)
    sbatch: tuple[str, ...] = ()  # more sbatch options, KEY=VALUE (--sbatch mail-type=END --sbatch exclude=n1)
    bench: str = ""  # --dry_run: a bench.py --json output, whose projection gives the GPU-hours


class SweepError(ValueError):
    """A sweep that cannot be planned as asked, with a message for the user."""


# ---------------------------------------------------------------------------------------------------------------
# The plan: sweep.json


def parse_games(text: str) -> list[str]:
    """Canonical names of a comma list of games, "atari100k" standing for Table 1's 26."""
    from env import ATARI_100K_GAMES, canonical_game

    games = []
    for item in (part.strip() for part in text.split(",")):
        for game in ATARI_100K_GAMES if item.lower() == "atari100k" else [canonical_game(item)] if item else []:
            games += [game] if game not in games else []
    if not games:
        raise SweepError("--games names no game")
    return games


def run_name(game: str, seed: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', game)}-s{seed}"


def runs_config(config: dict[str, Any]) -> dict[str, Any]:
    """The IRISConfig (as a dict) shared by the sweep's runs: everything but the per-run fields."""
    return {key: value for key, value in config.items() if key not in PER_RUN_KEYS}


def plan_sweep(sweep_dir: Path, games: list[str], seeds: int, run_config: Any) -> tuple[dict, list[dict]]:
    """(the sweep, as sweep.json holds it, with these runs added; the runs of this command, in plan order).

    A sweep started again must get the same runs' config: its runs would otherwise resume with their stored one.
    """
    from agent import RUN_SPECIFIC_KEYS, differing_keys

    config = runs_config(asdict(run_config))
    path = sweep_dir / SWEEP_FILE
    sweep = json.loads(path.read_text()) if path.is_file() else {"config": config, "runs": [], "jobs": {}}
    differing = [key for key in differing_keys(sweep["config"], config) if key not in RUN_SPECIFIC_KEYS]
    if differing:
        raise SweepError(
            f"{sweep_dir} was planned with another config ({', '.join(differing[:8])} differ); give the flags it "
            f"was started with (its {SWEEP_FILE} holds them) or choose another --out"
        )
    planned = {run["name"]: run for run in sweep["runs"]}
    wanted = []
    for game in games:
        for seed in range(seeds):
            name = run_name(game, seed)
            if name not in planned:
                planned[name] = {"name": name, "game": game, "seed": seed, "dir": f"runs/{name}"}
                sweep["runs"].append(planned[name])
            wanted.append(planned[name])
    return sweep, wanted


def save_sweep(sweep_dir: Path, sweep: dict) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep_dir / f".{SWEEP_FILE}.tmp"
    tmp.write_text(json.dumps(sweep, indent=2) + "\n")
    os.replace(tmp, sweep_dir / SWEEP_FILE)


def flag_text(value: Any) -> str:
    """A config value as train.py's flags read it (agent.parse_value)."""
    if isinstance(value, bool):
        return str(value).lower()
    return ",".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


def job_runs(sweep_dir: Path, runs: list[dict], run_config: Any, preset: str) -> list[dict]:
    """What a job needs of each run: its directory, and train.py's arguments to start it and to resume it."""
    from agent import PRESETS, IRISConfig, flat_fields

    defaults = {**flat_fields(IRISConfig()), **PRESETS[preset]}
    flags = ["--preset", preset] if preset != "paper" else []
    for name, value in flat_fields(run_config).items():  # the fields that differ from the preset's values
        if name not in PER_RUN_KEYS and value != defaults[name]:
            flags += [f"--{name}", flag_text(value)]
    device = [] if run_config.device == "auto" else ["--device", run_config.device]
    jobs = []
    for run in runs:
        run_dir = str(sweep_dir.resolve() / run["dir"])
        start = ["--game", run["game"], "--seed", str(run["seed"]), "--out", run_dir, *flags]
        jobs.append({"name": run["name"], "dir": run_dir, "start": start, "resume": ["--resume", run_dir, *device]})
    return jobs


# ---------------------------------------------------------------------------------------------------------------
# A job: the runs of one Slurm task (or of the local job), each in its own train.py


class SweepJob(submitit.helpers.Checkpointable):
    """Trains its runs side by side, `concurrent` at a time, each in a train.py process of its own.

    A run with a checkpoint resumes (train.py --resume); a finished one is skipped. On a time limit or preemption
    submitit calls checkpoint(): it stops every train.py with SIGTERM (each keeps its last complete epoch) and
    returns the same call, which submitit requeues.
    """

    def __init__(self, sweep_dir: str, runs: list[dict], concurrent: int, runs_per_gpu: int) -> None:
        self.sweep_dir, self.runs, self.concurrent, self.runs_per_gpu = sweep_dir, runs, concurrent, runs_per_gpu
        self.processes: dict[str, subprocess.Popen] = {}  # run name -> its live train.py

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "processes": {}}  # processes are this process's only

    def __call__(self) -> dict[str, str]:
        """{run: "done", "stopped" (resumes at the next start), "failed", or "skipped: why"}."""
        logs = Path(self.sweep_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        queue, outcomes, slots, beat = list(self.runs), {}, {}, 0.0
        stopping = False  # a train.py was stopped by a signal from outside: the machine is going away
        try:
            while slots or (queue and not stopping):
                for slot in range(self.concurrent):
                    while slot not in slots and queue and not stopping:
                        run = queue.pop(0)
                        if reason := skip_reason(Path(run["dir"])):
                            outcomes[run["name"]] = f"skipped: {reason}"
                        else:
                            slots[slot] = (run, self.start(run, logs, slot_device(slot, self.runs_per_gpu)))
                time.sleep(POLL_SECONDS)
                if time.time() - beat >= HEARTBEAT_SECONDS:
                    beat = time.time()
                    for run, _ in slots.values():
                        (logs / f"{run['name']}.alive").touch()
                for slot, (run, process) in list(slots.items()):
                    if process.poll() is not None:
                        del slots[slot], self.processes[run["name"]]
                        outcomes[run["name"]] = finish(run, process.returncode, logs)
                        stopping |= outcomes[run["name"]] == "stopped"
        finally:  # an error or Ctrl-C here: no train.py outlives its job
            stop_processes(self.processes, logs, "the job ended")
        print(f"{socket.gethostname()}: " + ", ".join(f"{name} {outcome}" for name, outcome in outcomes.items()))
        return outcomes

    def start(self, run: dict, logs: Path, device: str | None) -> subprocess.Popen:
        run_dir = Path(run["dir"])
        if (run_dir / "checkpoint.pt").is_file():
            args = run["resume"]
        elif (run_dir / "config.json").is_file():  # stopped before its first epoch was saved: start afresh
            args = [*run["start"], "--overwrite"]
        else:
            args = run["start"]
        (logs / f"{run['name']}.failed").unlink(missing_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        with open(logs / f"{run['name']}.log", "a") as log:
            log.write(f"--- sweep.py {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: ")
            log.write(f"python train.py {shlex.join(args)}\n")
            log.flush()
            process = subprocess.Popen(
                [sys.executable, str(REPO / "train.py"), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=ignore_requeue_signal,  # safe: a job starts no threads
            )
        self.processes[run["name"]] = process
        (logs / f"{run['name']}.alive").touch()
        return process

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on USR2 (time limit, or a preemption that sends it): stop, then requeue this call.

        The runs stop here, before submitit asks Slurm to requeue the task, which ends its processes at once.
        """
        stop_processes(self.processes, Path(self.sweep_dir) / "logs", "stopped for the job's requeue")
        return submitit.helpers.DelayedSubmission(
            SweepJob(self.sweep_dir, self.runs, self.concurrent, self.runs_per_gpu)
        )


def ignore_requeue_signal() -> None:
    """In each train.py (before exec): ignore the USR2 that Slurm sends to every process of the task. Its default
    action would kill train.py at once; the job's checkpoint() stops it with SIGTERM instead, which saves."""
    signal.signal(getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")), signal.SIG_IGN)


def slot_device(slot: int, runs_per_gpu: int) -> str | None:
    """The GPU of a slot: runs_per_gpu slots share each of the task's GPUs (CUDA_VISIBLE_DEVICES); None: leave it."""
    devices = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    return devices[(slot // runs_per_gpu) % len(devices)] if devices else None


def skip_reason(run_dir: Path) -> str:
    """Why a run is not to be started: finished, or its train.py alive elsewhere (it holds RUN_DIR/.lock)."""
    if (run_dir / FINAL_EVAL).is_file():
        return "done"
    if not (run_dir / LOCK_FILE).is_file():
        return ""
    descriptor = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return "its train.py runs elsewhere"
    finally:
        os.close(descriptor)  # releases the shared lock at once
    return ""


def finish(run: dict, code: int, logs: Path) -> str:
    """The outcome of a run's train.py by its exit code; a failure is recorded in logs/<run>.failed."""
    (logs / f"{run['name']}.alive").unlink(missing_ok=True)
    if code == 0 and (Path(run["dir"]) / FINAL_EVAL).is_file():
        return "done"
    if code in STOP_EXIT_CODES:
        return "stopped"
    reason = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    failure = {"reason": reason, "host": socket.gethostname(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    (logs / f"{run['name']}.failed").write_text(json.dumps(failure) + "\n")
    return "failed"


def stop_processes(processes: dict[str, subprocess.Popen], logs: Path, why: str) -> None:
    """SIGTERM to each live train.py (it keeps its last complete epoch), wait, and say so in the run's log."""
    live = {name: process for name, process in processes.items() if process.poll() is None}
    for process in live.values():
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    for name, process in live.items():
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with open(logs / f"{name}.log", "a") as log:
            log.write(
                f"--- sweep.py {time.strftime('%Y-%m-%d %H:%M:%S')}: {why}; train.py exit code {process.returncode}\n"
            )


def aggregate_sweep(sweep_dir: str) -> int:
    """evaluate.py --aggregate over the finished runs: aggregate.txt (the table), aggregate.json, per_run_scores.json
    (the layout of the authors' IRIS.json). Returns evaluate.py's exit code."""
    sweep = Path(sweep_dir)
    command = [sys.executable, str(REPO / "evaluate.py"), "--aggregate", str(sweep), "--out"]
    command += [str(sweep / "aggregate.json"), "--scores_out", str(sweep / "per_run_scores.json")]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    (sweep / "aggregate.txt").write_text(proc.stdout + proc.stderr)
    print(proc.stdout + proc.stderr, end="")
    return proc.returncode


# ---------------------------------------------------------------------------------------------------------------
# State of each run, read from its files: --status, and what a start of the sweep skips


def run_status(sweep_dir: Path, run: dict, epochs: int) -> dict[str, Any]:
    """{"state", "epoch", "epochs", "last_return" (text), "note"} of one planned run."""
    run_dir, logs = sweep_dir / run["dir"], sweep_dir / "logs"
    rows = []
    if (run_dir / "metrics.csv").is_file():
        with open(run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    if (run_dir / "config.json").is_file():
        epochs = json.loads((run_dir / "config.json").read_text()).get("epochs", epochs)
    evaluated = [row for row in rows if row.get("eval/return")]
    last = f"{float(evaluated[-1]['eval/return']):.2f} (epoch {evaluated[-1]['epoch']})" if evaluated else "-"
    alive, failed = logs / f"{run['name']}.alive", logs / f"{run['name']}.failed"
    status = {"state": "pending", "epoch": int(rows[-1]["epoch"]) if rows else 0, "epochs": epochs, "note": ""}
    if (run_dir / FINAL_EVAL).is_file():
        final = json.loads((run_dir / FINAL_EVAL).read_text())
        status["state"] = "done"
        last = f"{final['mean_return']:.2f} (final, {final.get('episodes', '?')} episodes)"
    elif alive.is_file() and time.time() - alive.stat().st_mtime < STALE_SECONDS:
        status["state"] = "running"
    elif failed.is_file():
        status["state"] = "failed"
        status["note"] = f"{json.loads(failed.read_text())['reason']}, see {logs / (run['name'] + '.log')}"
    return {**status, "last_return": last}


def format_status(sweep_dir: Path) -> str:
    if not (sweep_dir / SWEEP_FILE).is_file():
        raise SweepError(f"{sweep_dir}: no {SWEEP_FILE}, not a sweep of sweep.py")
    sweep = json.loads((sweep_dir / SWEEP_FILE).read_text())
    statuses = {run["name"]: run_status(sweep_dir, run, sweep["config"]["epochs"]) for run in sweep["runs"]}
    counts = ", ".join(f"{sum(s['state'] == state for s in statuses.values())} {state}" for state in STATES)
    lines = [f"{sweep_dir}: {len(statuses)} runs: {counts}"]
    lines.append(f"{'run':<22}{'state':<9}{'epoch':>11}  {'last evaluation return':<30}job")
    for name, s in statuses.items():
        epoch = f"{s['epoch']}/{s['epochs']}"
        job = sweep.get("jobs", {}).get(name, "-")
        lines.append(f"{name:<22}{s['state']:<9}{epoch:>11}  {s['last_return']:<30}{job:<12}{s['note']}".rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Executors


def slurm_parameters(config: SweepConfig, name: str) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters: sbatch options of each task of the array."""
    extra = dict(option.split("=", 1) if "=" in option else (option, True) for option in config.sbatch)
    parameters = {
        "job_name": f"iris-{name}",
        "time": config.time_min,
        "ntasks_per_node": 1,
        "gpus_per_node": config.gpus_per_task,
        "cpus_per_task": config.cpus_per_task,
        "signal_delay_s": config.signal_delay_s,
        "array_parallelism": config.array_parallelism,
        "additional_parameters": {"requeue": True, **extra},  # Slurm may requeue a preempted task
    }
    parameters.update({key: getattr(config, key) for key in ("partition", "account", "qos", "constraint")})
    parameters["mem"] = f"{config.mem_gb}GB" if config.mem_gb else None
    return {key: value for key, value in parameters.items() if value not in ("", None)}


def submit_slurm(sweep_dir: Path, config: SweepConfig, runs: list[dict]) -> dict[str, str]:
    """One job array, runs_per_gpu x gpus_per_task runs per task; then the aggregate, after the whole array."""
    per_task = config.runs_per_gpu * config.gpus_per_task
    folder = sweep_dir.resolve() / "submitit"
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=config.max_timeouts)
    executor.update_parameters(**slurm_parameters(config, sweep_dir.name))
    with executor.batch():
        jobs = [
            executor.submit(SweepJob(str(sweep_dir.resolve()), runs[i : i + per_task], per_task, config.runs_per_gpu))
            for i in range(0, len(runs), per_task)
        ]
    job_ids = {run["name"]: job.job_id for i, job in enumerate(jobs) for run in runs[i * per_task : (i + 1) * per_task]}
    array = jobs[0].job_id.split("_")[0]
    aggregate = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    options = {key: getattr(config, key) for key in ("partition", "account", "qos") if getattr(config, key)}
    aggregate.update_parameters(
        job_name=f"iris-{sweep_dir.name}-aggregate", time=60, cpus_per_task=2, dependency=f"afterany:{array}", **options
    )
    aggregate_job = aggregate.submit(aggregate_sweep, str(sweep_dir.resolve()))
    print(
        f"submitted job array {array}: {len(jobs)} tasks of {per_task} runs ({config.runs_per_gpu} per GPU), "
        f"{config.time_min} min each before a requeue; then job {aggregate_job.job_id}: the aggregate\n"
        f"sbatch script and job logs: {folder}; train.py logs: {sweep_dir / 'logs'}\n"
        f"follow with: python sweep.py --status {sweep_dir}"
    )
    return job_ids


def visible_gpus() -> list[int]:
    """This machine's GPUs as CUDA numbers them for a child: CUDA_VISIBLE_DEVICES if set, else all of torch's."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(torch.cuda.device_count()))
    try:
        return [int(d) for d in visible.split(",") if d.strip()]
    except ValueError as error:
        raise SweepError(f"CUDA_VISIBLE_DEVICES={visible!r}: give GPU numbers for a local sweep") from error


def local_parallel(config: SweepConfig, gpus: list[int]) -> int:
    return config.parallel or max(1, config.runs_per_gpu * len(gpus))


def run_local(sweep_dir: Path, config: SweepConfig, runs: list[dict]) -> dict[str, str]:
    """One local job running the runs `parallel` at a time; waits for it, printing the counts as they change."""
    gpus = visible_gpus()
    parallel = local_parallel(config, gpus)
    folder = sweep_dir.resolve() / "submitit"
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=config.max_timeouts)
    # gpus_per_node 0 makes submitit hide every GPU (CUDA_VISIBLE_DEVICES=""), which is right without one.
    executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, gpus_per_node=len(gpus), visible_gpus=gpus)
    job = executor.submit(SweepJob(str(sweep_dir.resolve()), runs, parallel, config.runs_per_gpu))
    print(
        f"local job {job.job_id}: {len(runs)} runs, {parallel} at a time; train.py logs: {sweep_dir / 'logs'}; "
        f"job log: {job.paths.stdout}"
    )
    save_jobs(sweep_dir, {run["name"]: job.job_id for run in runs})
    last = ""
    while not job.done():
        counts = format_status(sweep_dir).splitlines()[0]
        if counts != last:
            print(counts, flush=True)
            last = counts
        time.sleep(2 * POLL_SECONDS)
    try:
        outcomes = job.result()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as error:
        print(f"the local job ended with an error; see {job.paths.stderr}\n{error}", file=sys.stderr)
        outcomes = {}
    return outcomes


def save_jobs(sweep_dir: Path, job_ids: dict[str, str]) -> None:
    sweep = json.loads((sweep_dir / SWEEP_FILE).read_text())
    sweep["jobs"] = {**sweep.get("jobs", {}), **job_ids}
    save_sweep(sweep_dir, sweep)


# ---------------------------------------------------------------------------------------------------------------
# --dry_run: the plan and its projected GPU-hours


def projection_line(bench_file: str, config: dict, runs: int, runs_per_gpu: int) -> str:
    """GPU-hours of the runs from a bench.py --json output, when it timed this config."""
    from agent import RUN_SPECIFIC_KEYS, differing_keys

    if not bench_file:
        return "projection: none; time this config with `python bench.py --json FLAGS > bench.json`, add --bench"
    bench = json.loads(Path(bench_file).read_text())
    timed = bench["meta"].get("config")
    if timed is None:
        return f"projection: none; {bench_file} does not record the config it timed (bench.py of before sweeps)"
    differing = [k for k in differing_keys(runs_config(timed), config) if k not in RUN_SPECIFIC_KEYS]
    if differing:
        return f"projection: none; {bench_file} timed another config ({', '.join(differing[:8])} differ)"
    if bench["projection"] is None:
        return f"projection: none; {bench_file} lacks the phases a projection needs (bench.py --phases)"
    hours = bench["projection"]["run_hours"]
    return (
        f"projection (bench.py on {bench['meta']['device_name']}): {hours:.1f} h per run alone on the device; "
        f"{runs} runs: {runs * hours:,.0f} GPU-hours, {runs_per_gpu} per GPU each taking about {runs_per_gpu}x longer "
        f"(Appendix G: 7 days for two games on one A100); evaluations and checkpoints not counted"
    )


def print_plan(
    sweep_dir: Path,
    sweep: dict,
    wanted: list[dict],
    todo: list[dict],
    config: SweepConfig,
    run_config: Any,
    preset: str,
) -> None:
    statuses = {run["name"]: run_status(sweep_dir, run, sweep["config"]["epochs"]) for run in wanted}
    games = list(dict.fromkeys(run["game"] for run in wanted))
    print(f"plan: {len(games)} games x {config.seeds} seeds = {len(wanted)} runs in {sweep_dir / 'runs'}")
    for run in wanted:
        s = statuses[run["name"]]
        action = "submit" if run in todo else "skip"
        print(f"  {run['name']:<22}{action:<8}{s['state']:<9}epoch {s['epoch']}/{s['epochs']}")
    if todo:
        first = job_runs(sweep_dir, todo[:1], run_config, preset)[0]["start"]
        print(f"the first run: python train.py {shlex.join(first)}")
    if config.executor == "slurm":
        per_task = config.runs_per_gpu * config.gpus_per_task
        tasks = -(-len(todo) // per_task)
        options = " ".join(f"--{k}={v}" for k, v in slurm_parameters(config, sweep_dir.name).items())
        print(f"slurm: a job array of {tasks} tasks of {per_task} runs; {options}")
    else:
        print(f"local: {len(todo)} runs, {local_parallel(config, visible_gpus())} at a time")
    print(projection_line(config.bench, sweep["config"], len(todo), config.runs_per_gpu))
    print(f"{len(todo)} of {len(wanted)} runs to submit (dry run: nothing written, nothing submitted)")


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> tuple[SweepConfig, Any, argparse.Namespace]:
    """(SweepConfig, the runs' IRISConfig from train.py's flags, the sweep's own flags)."""
    import train
    from agent import CLIParser, config_overrides

    parser = CLIParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --seed is train.py's, not an abbreviation of --seeds
        epilog="Every flag of train.py sets the runs' config too, but --game, --seed, --out (python train.py -h).",
    )
    parser.add_argument("--status", type=Path, metavar="SWEEP_DIR", help="print each run's state, and stop")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and its projection; submit nothing")
    for f in fields(SweepConfig):
        kind = type(f.default) if not isinstance(f.default, tuple) else str
        action, default = ("append", []) if isinstance(f.default, tuple) else ("store", f.default)
        parser.add_argument(f"--{f.name}", type=kind, action=action, default=default, help=f"default {f.default!r}")
    args, rest = parser.parse_known_args(argv)
    if args.status is not None:
        return SweepConfig(), None, args
    run_config, train_args = train.parse_args(rest)
    if run_config is None or train_args.overwrite:
        parser.error("--resume and --overwrite are train.py's: start the sweep again to resume it")
    if per_run := sorted(set(config_overrides(train_args)) & {"game", "seed"}):
        parser.error(f"--{' and --'.join(per_run)}: the sweep sets them per run; give --games and --seeds")
    config = SweepConfig(**{f.name: getattr(args, f.name) for f in fields(SweepConfig)})
    config.sbatch = tuple(config.sbatch)
    args.preset = train_args.preset
    if not config.out:
        parser.error("--out SWEEP_DIR is required (or --status SWEEP_DIR)")
    if config.executor not in ("slurm", "local"):
        parser.error(f"--executor is slurm or local, not {config.executor!r}")
    small = [f"--{k}" for k in ("seeds", "runs_per_gpu", "gpus_per_task", "cpus_per_task") if getattr(config, k) < 1]
    if small or config.parallel < 0:
        parser.error(f"{', '.join(small) or '--parallel'} must be at least 1 (--parallel: 0 for the default)")
    return config, run_config, args


def main(argv: list[str] | None = None) -> None:
    config, run_config, args = parse_args(argv)
    try:
        if args.status is not None:
            print(format_status(args.status))
            return
        from agent import validate_config

        validate_config(run_config)  # the runs would each refuse it
        sweep_dir = Path(config.out)
        sweep, wanted = plan_sweep(sweep_dir, parse_games(config.games), config.seeds, run_config)
    except ValueError as error:  # SweepError, ConfigError, an unknown game
        sys.exit(f"sweep.py: error: {error}")
    states = {run["name"]: run_status(sweep_dir, run, sweep["config"]["epochs"])["state"] for run in wanted}
    todo = [run for run in wanted if states[run["name"]] not in ("done", "running")]
    if args.dry_run:
        print_plan(sweep_dir, sweep, wanted, todo, config, run_config, args.preset)
        return
    save_sweep(sweep_dir, sweep)
    if not todo:
        running = sum(state == "running" for state in states.values())
        print(f"nothing to submit: of {len(wanted)} runs, {len(wanted) - running} are done, {running} running")
        if not running:
            aggregate_sweep(str(sweep_dir))
        return
    # The jobs unpickle SweepJob from this module: they must find it wherever they start.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    runs = job_runs(sweep_dir, todo, run_config, args.preset)
    if config.executor == "slurm":
        save_jobs(sweep_dir, submit_slurm(sweep_dir, config, runs))
        return
    outcomes = run_local(sweep_dir, config, runs)
    print(format_status(sweep_dir))
    if any(outcome in ("done", "skipped: done") for outcome in outcomes.values()):
        aggregate_sweep(str(sweep_dir))


if __name__ == "__main__":
    import sweep  # submitit pickles SweepJob by reference to the module `sweep`, which a job can import; not __main__

    sweep.main()
