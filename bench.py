"""Speed of IRIS's training phases at a given config, and the time a full run would take (Algorithm 1, Table 5).

    python bench.py                                  # the paper's config on the best device (--device auto)
    python bench.py --preset tiny --repeats 3        # the tiny preset, as in the smoke tests
    python bench.py --phases actor_critic --json     # one phase, machine-readable

Each phase runs train.py's code, once per repeat, after warm-up runs; the table gives the median:
  tokenizer     one Adam step of (E, D) on tokenizer_batch_size frames (update_world_model, tokenizer only)
  encode        encode_dataset on encode_batch_size frames: once per epoch train.py encodes the whole dataset
                with the frozen E (cache_tokens); the projection scales this to the dataset's size at each epoch
  world_model   one AdamW step of G on world_model_batch_size segments of L steps (update_world_model's loss)
  actor_critic  one Adam step of (π, V): burn-in, H imagined steps, losses and backward (update_behavior)
  imagination   imagine() alone, without gradients: imagined frames per second (burn-in and decoding included)
  collection    collect_experience of one epoch: Agent.act on x̂ = D(E(x)) in a real training env
  replay        one batch of each component sampled from the dataset at the end of collection
                (collection_epochs x env_steps_per_epoch steps of random frames, which all phases sample from)
With cache_tokens, G and (π, V) read z from a table of the dataset's tokens, as train.py does; here it holds
random codes (the frames are random too), and filling it is what the encode phase times.
Then an epoch at the end of collection and the whole run (collection in the first collection_epochs epochs,
components after the delays of Table 5) are projected from the config. Evaluation and checkpoints are not counted.

The perceptual loss needs VGG16's ImageNet weights, a download; here VGG16 has random weights (same cost).
Speed is measured here, never in tests: numbers depend on the machine and its load (shown in the header).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

import train
from agent import COMPONENTS, Agent, CLIParser, IRISConfig, pick_device, set_field, set_seed, setup_process
from actor_critic import imagine
from env import make_env
from replay import ReplayBuffer
from world_model import WorldModelEnv

PHASES = ("tokenizer", "encode", "world_model", "actor_critic", "imagination", "collection", "replay")
MIB = 2**20


@dataclass
class Bench:
    """What the phases share: one agent and its optimizers, a real env, and the full-size dataset (built lazily)."""

    config: IRISConfig
    agent: Agent
    optimizers: dict[str, torch.optim.Optimizer]
    env: Any

    @cached_property
    def replay(self) -> ReplayBuffer:
        cfg = self.config
        return random_replay(cfg, cfg.collection_epochs * cfg.env_steps_per_epoch, self.agent)  # 100k steps

    @cached_property
    def tokens(self) -> torch.Tensor | None:
        """The token table of train.py's cache_tokens, z_t for every stored frame, (len(replay), K); random codes."""
        tok = self.config.tokenizer
        shape = (len(self.replay), tok.tokens_per_frame)
        return torch.randint(0, tok.vocab_size, shape, device=self.agent.device) if self.config.cache_tokens else None

    def run(self, config: IRISConfig, replay: ReplayBuffer | None = None) -> train.Run:
        """A train.Run on the full dataset and its token table, or on another dataset without one."""
        tokens = self.tokens if replay is None else None
        return train.Run(
            config,
            self.agent,
            self.optimizers,
            replay or self.replay,
            Path(tempfile.gettempdir()),
            env=self.env,
            tokens=tokens,
        )


def random_replay(cfg: IRISConfig, size: int, agent: Agent) -> ReplayBuffer:
    """A dataset D of size steps of random frames, in episodes of the longest training length."""
    episode_length = cfg.env.max_train_frames // cfg.env.frame_skip  # 5,000 agent steps
    replay = ReplayBuffer(agent.actor_critic.frame_shape, device=agent.device, chunk_size=size)  # one allocation
    for start in range(0, size, episode_length):
        length = min(episode_length, size - start)
        frames = torch.randint(0, 256, (length, *replay.obs_shape), dtype=torch.uint8)  # (T, 3, 64, 64)
        for t in range(length):
            replay.add(frames[t], (start + t) % agent.num_actions, 0.0, terminated=t == length - 1)
    return replay


# ---------------------------------------------------------------------------------------------------------------
# The phases: each returns (a function doing one run, the work it does, the unit of that work)


def phase(bench: Bench, name: str) -> tuple[Callable[[], Any], int, str]:
    cfg, agent, ac = bench.config, bench.agent, bench.config.actor_critic
    one_step = replace(cfg, training_steps_per_epoch=1)
    if name == "tokenizer":  # G and (π, V) wait past the last epoch: update_world_model trains E and D only
        run = bench.run(
            replace(one_step, start_world_model_after_epochs=cfg.epochs, start_actor_critic_after_epochs=cfg.epochs)
        )
        epoch = cfg.start_tokenizer_after_epochs + 1
        return lambda: train.update_world_model(run, epoch, "tokenizer"), cfg.tokenizer_batch_size, "frames"
    if name == "encode":  # one call of the tokenizer on encode_batch_size frames
        run = bench.run(
            replace(cfg, encode_batch_size=min(cfg.encode_batch_size, len(bench.replay))),
            random_replay(cfg, min(cfg.encode_batch_size, len(bench.replay)), agent),
        )
        agent.tokenizer.eval()
        epoch = max(cfg.start_world_model_after_epochs, cfg.start_actor_critic_after_epochs) + 1
        return lambda: train.encode_dataset(run, epoch), len(run.replay), "frames"
    if name == "world_model":  # update_world_model's step of G, without its encoding of the dataset (see encode)
        run = bench.run(one_step)
        work = cfg.world_model_batch_size * cfg.world_model.max_timesteps
        epoch = cfg.start_world_model_after_epochs + 1
        return lambda: train.update_world_model(run, epoch, "world_model"), work, "steps"
    if name == "actor_critic":
        run, epoch = bench.run(one_step), cfg.start_actor_critic_after_epochs + 1
        work = cfg.actor_critic_batch_size * ac.imagination_horizon
        return lambda: train.update_behavior(run, epoch), work, "imagined steps"
    if name == "imagination":
        run, wm_env = bench.run(cfg), WorldModelEnv(agent.tokenizer, agent.world_model)

        def rollout() -> None:
            batch = run.replay.sample(
                cfg.actor_critic_batch_size, ac.burn_in + 1, sample_from_start=False, device=agent.device
            )
            with torch.no_grad(), agent.autocast():
                imagine(
                    agent.actor_critic,
                    wm_env,
                    batch["observations"],
                    batch["mask"],
                    ac.imagination_horizon,
                    tokens=train.segment_tokens(run, batch),
                )

        return rollout, cfg.actor_critic_batch_size * ac.imagination_horizon, "frames"
    if name == "collection":
        run = bench.run(cfg, ReplayBuffer(agent.actor_critic.frame_shape, device=agent.device))
        run.obs, _ = bench.env.reset(seed=cfg.seed)
        return lambda: train.collect_experience(run, cfg.env_steps_per_epoch), cfg.env_steps_per_epoch, "env steps"
    if name == "replay":

        def sample_batches(replay: ReplayBuffer = bench.replay) -> None:  # the batches of one step of each component
            replay.sample_frames(cfg.tokenizer_batch_size, device=agent.device)
            replay.sample(cfg.world_model_batch_size, cfg.world_model.max_timesteps, True, device=agent.device)
            replay.sample(cfg.actor_critic_batch_size, ac.burn_in + 1, False, device=agent.device)

        return sample_batches, 1, "sample sets"
    raise ValueError(f"unknown phase {name!r}; choose from {', '.join(PHASES)}")


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_window(device: torch.device) -> Callable[[], float | None]:
    """Start a peak-memory window; the function returned gives its peak in MiB, or None where it cannot be read.

    CUDA: peak bytes allocated by torch. CPU (Linux): growth of the peak resident set size over the window.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return lambda: torch.cuda.max_memory_allocated(device) / MIB
    try:  # writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        baseline = status_kib("VmRSS")
    except OSError:
        return lambda: None
    return lambda: (status_kib("VmHWM") - baseline) / 1024


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    peak_mib = memory_window(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "runs": times, "peak_mib": peak_mib()}


def project(cfg: IRISConfig, phases: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """An epoch at the end of collection and the whole run, from the config's epochs, delays and steps (Table 5)."""
    needed = {"collection", *COMPONENTS} | ({"encode"} if cfg.cache_tokens else set())
    if not needed <= phases.keys():
        return None
    seconds = {name: row["seconds"] for name, row in phases.items()}
    steps_at = [min(e, cfg.collection_epochs) * cfg.env_steps_per_epoch for e in range(1, cfg.epochs + 1)]
    epochs = {"collection": min(cfg.collection_epochs, cfg.epochs)}  # epochs in which each part runs
    epochs.update({c: max(0, cfg.epochs - getattr(cfg, f"start_{c}_after_epochs")) for c in COMPONENTS})
    epoch = {"collection": seconds["collection"]}  # one run of the phase is one epoch's collection
    epoch.update({c: cfg.training_steps_per_epoch * seconds[c] for c in COMPONENTS})
    total = sum(epoch[k] * epochs[k] for k in epoch)
    if cfg.cache_tokens:  # the dataset is encoded in every epoch where G or (π, V) trains, at its size then
        per_frame = seconds["encode"] / phases["encode"]["work"]
        first = min(cfg.start_world_model_after_epochs, cfg.start_actor_critic_after_epochs)
        epochs["encode"] = max(0, cfg.epochs - first)
        epoch["encode"] = per_frame * steps_at[-1]
        total += per_frame * sum(steps_at[first:])
    return {
        "epoch_seconds": sum(epoch.values()),
        "epoch_parts": epoch,
        "epochs_per_part": epochs,
        "dataset_steps": steps_at[-1],
        "run_hours": total / 3600,
    }


# ---------------------------------------------------------------------------------------------------------------
# Command line and report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here; platform.processor() often says only "x86_64"
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def parse_bench_args(argv: list[str] | None = None) -> tuple[IRISConfig, argparse.Namespace]:
    parser = CLIParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="Every flag of train.py is accepted too: --preset "
        "tiny, --device cpu, --game Breakout, --tokenizer.ch 32... (python train.py -h)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per phase; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per phase before the timed ones")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list among: {', '.join(PHASES)}")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args, rest = parser.parse_known_args(argv)
    config, train_args = train.parse_args(rest)
    if config is None:
        parser.error("--resume does not apply to bench.py")
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := set(args.phases) - set(PHASES):
        parser.error(f"unknown phases {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    args.preset = train_args.preset
    return config, args


def print_table(result: dict[str, Any], cfg: IRISConfig) -> None:
    meta = result["meta"]
    print(
        f"iris bench | preset {meta['preset']} | {meta['device']} ({meta['device_name']}) | torch {meta['torch']} "
        f"| {meta['threads']} threads"
    )
    loads = [" ".join(f"{x:.2f}" for x in meta[key]) for key in ("load_start", "load_end")]
    print(f"load average (1, 5, 15 min): {loads[0]} at start, {loads[1]} at end")
    print(f"median of {meta['repeats']} timed runs after {meta['warmup']} warm-up runs | {meta['perceptual']}")
    print(f"peak memory: {meta['memory']} | {meta['fast_paths']}")
    if meta["device"] == "cpu" and meta["threads"] > 1 and meta["load_start"][0] >= (os.cpu_count() or 1):
        print(
            "note: other processes keep every core busy; torch's threads then wait on each other, and times can be "
            "several times longer than on an idle machine (try --threads 1)"
        )
    print(f"\n{'phase':<13} {'work per run':<22} {'median s':>9} {'throughput':<28} {'peak MiB':>8}")
    for name, row in result["phases"].items():
        memory = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        print(
            f"{name:<13} {row['work']:>6} {row['unit']:<15} {row['seconds']:>9.3f} "
            f"{row['work'] / row['seconds']:>10.1f} {row['unit'] + '/s':<17} {memory:>8}"
        )
    projection = result["projection"]
    if projection is None:
        print("\nprojection: needs the phases collection, tokenizer, world_model, actor_critic (and encode)")
        return
    parts = projection["epoch_parts"]
    shares = ", ".join(f"{k} {v:.0f} s ({100 * v / projection['epoch_seconds']:.0f}%)" for k, v in parts.items())
    print(
        f"\nepoch at the end of collection ({cfg.env_steps_per_epoch} env steps, {cfg.training_steps_per_epoch} "
        f"steps of each component, dataset of {projection['dataset_steps']} steps): "
        f"{projection['epoch_seconds']:.0f} s = {shares}"
    )
    counts = ", ".join(f"{k} in {n}" for k, n in projection["epochs_per_part"].items())
    hours = projection["run_hours"]
    length = f"{hours:.1f} h" if hours >= 1 else f"{60 * hours:.1f} min"
    print(f"full run of {cfg.epochs} epochs ({counts} epochs): {length} (evaluation and checkpoints not counted)")


def fast_paths(agent: Agent) -> str:
    cfg = agent.config
    with agent.autocast():
        bf16 = torch.is_autocast_enabled(agent.device.type)
    return (
        f"bf16 autocast {'on' if bf16 else 'off'}, cache_tokens {cfg.cache_tokens}, fused_adam {cfg.fused_adam}, "
        f"channels_last {cfg.channels_last}, reuse_freed_memory {cfg.reuse_freed_memory}"
    )


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_bench_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if cfg.tokenizer.perceptual_weight > 0:
        set_field(cfg, "tokenizer.pretrained_vgg", False)
    load_start = os.getloadavg()
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    env = make_env(cfg.game, train=True, seed=cfg.seed, config=cfg.env)
    setup_process(cfg, device)
    agent = Agent(cfg, int(env.action_space.n), device)
    if cfg.tokenizer.perceptual_weight > 0:
        agent.tokenizer.perceptual_net()  # build VGG16 now, not inside the first timed step
    bench = Bench(cfg, agent, agent.make_optimizers(), env)
    phases = {}
    for name in (p for p in PHASES if p in args.phases):
        fn, work, unit = phase(bench, name)
        phases[name] = {"work": work, "unit": unit, **measure(fn, device, args.warmup, args.repeats)}
    result = {
        "meta": {
            "preset": args.preset,
            "config": asdict(cfg),  # what sweep.py --dry_run checks before it uses the projection
            "device": str(device),
            "device_name": device_name(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_start": load_start,
            "load_end": os.getloadavg(),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "perceptual": "perceptual loss on, VGG16 with random weights (ImageNet weights are a download; same cost)"
            if cfg.tokenizer.perceptual_weight > 0
            else "perceptual loss off (weight 0)",
            "fast_paths": fast_paths(agent),
            "memory": "CUDA max_memory_allocated"
            if device.type == "cuda"
            else "growth of the peak resident set size (VmHWM) over the phase, warm-up included",
        },
        "phases": phases,
        "projection": project(cfg, phases),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result, cfg)


if __name__ == "__main__":
    main()
