"""IRIS training: Algorithm 1 of Appendix D, with the hyperparameters of Tables 2-6 (Appendix A).

    python train.py --game Pong                  # the paper's agent (a GPU run of days)
    python train.py --game Pong --preset tiny    # every phase, small enough for a laptop CPU
    python train.py --resume runs/Pong-...       # continue a killed run from its last epoch

Each epoch (Algorithm 1, training_loop): collect_experience in the real environment with the current
policy, update_world_model (the discrete autoencoder (E, D), then the Transformer G), update_behavior
(the actor-critic, purely in imagination). Components start after the warm-up delays of Table 5.
The agent, its config (IRISConfig, PRESETS) and checkpoints live in agent.py.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from actor_critic import actor_critic_loss, imagine
from agent import CHECKPOINT, PREVIOUS, Agent, IRISConfig, config_from_checkpoint, config_json_edits, differing_keys
from agent import load_run_checkpoint, pick_device, rng_states, set_rng_states, set_seed, setup_process
from agent import CLIParser, add_config_flags, config_from_args, config_overrides, cpu_time_warning, validate_config
from agent import STOP, catch_stop_signals, deferred_signals, figure4_video, write_video
from env import canonical_game, make_env
from replay import ReplayBuffer, atomic_save, write_csv, write_json
from tokenizer import token_usage
from world_model import WorldModelEnv

EVAL_SEED_OFFSET = 10_000  # test envs draw other no-op starts than the training env's seeds
MEDIA_FRAMES = 8  # real frames (and their reconstructions) in each PNG
MEDIA_BORDER = 2  # pixels of the Figure 4-style colour frame around each imagined frame
MEDIA_GIF_MS = 200  # milliseconds per imagined step in the GIF
# fmt: off
SUMMARY_KEYS = ("env_steps", "collect/return", "tokenizer/reconstruction", "world_model/transition", "world_model/reward",
                "actor_critic/value", "actor_critic/imagined_return", "eval/return")
# fmt: on


@dataclass
class Run:
    """Everything a run mutates; saved every epoch so that a killed run resumes where it stopped."""

    config: IRISConfig
    agent: Agent
    optimizers: dict[str, torch.optim.Optimizer]
    replay: ReplayBuffer
    run_dir: Path
    epoch: int = 0  # last completed epoch
    history: list[dict[str, float]] = field(default_factory=list)  # one row of metrics per epoch
    tokens: torch.Tensor | None = None  # z_t = E(x_t) of every stored frame, (len(replay), K), this epoch's E
    env: Any = None  # the training environment (life loss ends the learner's episode)
    obs: np.ndarray | None = None  # x_t, the frame the next action is taken in
    first: bool = True  # x_t starts an episode


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1 (Appendix D)


def training_loop(run: Run) -> None:
    """Algorithm 1: for each epoch, collect_experience, update_world_model, update_behavior."""
    cfg = run.config
    for epoch in range(run.epoch + 1, cfg.epochs + 1):
        metrics: dict[str, Any] = {"epoch": epoch}
        with timed(metrics, "collect"):
            if epoch <= cfg.collection_epochs:
                metrics.update(collect_experience(run, cfg.env_steps_per_epoch))
        with timed(metrics, "world_model"):
            metrics.update(update_world_model(run, epoch, "tokenizer"))  # update E and D
            run.tokens = encode_dataset(run, epoch)  # z_t = E(x_t) of every stored frame: E is frozen until next epoch
            if run.tokens is not None:  # E's use of its codebook on the dataset: a collapse shows as few codes and maps
                metrics.update({f"tokenizer/{k}": v for k, v in token_usage(run.tokens).items()})
            metrics.update(update_world_model(run, epoch, "world_model"))  # update G
        with timed(metrics, "behavior"):
            metrics.update(update_behavior(run, epoch))
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            with timed(metrics, "eval"):
                metrics.update(evaluate_agent(run, cfg.eval_episodes))
                save_media(run, epoch)
        with deferred_signals():  # a stop waits for the save: the run on disk is never half-written
            metrics["env_steps"] = len(run.replay)
            run.epoch = epoch
            run.history.append(metrics)
            save_run(run)
            print(summary_line(metrics), flush=True)
    final = evaluate_agent(run, cfg.final_eval_episodes)
    result = {"game": cfg.game, "epoch": run.epoch, "episodes": cfg.final_eval_episodes, "env_steps": len(run.replay)}
    result.update(mean_return=final["eval/return"], returns=final["eval/returns"])
    with deferred_signals():
        write_json(run.run_dir / FINAL_EVAL, result)
    print(f"final evaluation over {cfg.final_eval_episodes} episodes: mean return {final['eval/return']:.2f}")


@contextlib.contextmanager
def timed(metrics: dict[str, Any], phase: str) -> Iterator[None]:
    """Adds the wall time of the block to metrics as time/<phase>."""
    start = time.perf_counter()
    yield
    metrics[f"time/{phase}"] = time.perf_counter() - start


def collect_experience(run: Run, n: int) -> dict[str, float]:
    """Algorithm 1, collect_experience(n): act with π on x̂_t = D(E(x_t)) and add {x_t, a_t, r_t, d_t} to D."""
    cfg, agent = run.config, run.agent
    agent.eval()
    # As the reference collector: π's LSTM state burnt in with the current weights on the episode's last burn_in
    # frames (left-padded), so that an evaluation or an update since the last call leaves no stale state.
    frames, mask = run.replay.last_frames(cfg.actor_critic.burn_in)  # (T, 3, 64, 64) uint8, (T,) bool
    agent.burn_in(frames[None], mask[None])
    returns, episode_return = [], 0.0
    for _ in tqdm(range(n), desc="collect", leave=False, disable=None):
        action = agent.act(run.obs[None], np.array([run.first]), cfg.collect_temperature, cfg.collect_epsilon)[0]
        next_obs, reward, terminated, truncated, _ = run.env.step(action)
        run.replay.add(run.obs, int(action), float(reward), bool(terminated), bool(truncated))
        episode_return += float(reward)
        run.obs, run.first = next_obs, bool(terminated or truncated)
        if run.first:
            returns.append(episode_return)
            episode_return = 0.0
            run.obs, _ = run.env.reset()
    return {"collect/return": float(np.mean(returns))} if returns else {}


def update_world_model(run: Run, epoch: int, name: str) -> dict[str, float]:
    """Algorithm 1, update_world_model: `tokenizer` updates (E, D) on frames, `world_model` updates G on segments
    (as in the reference code, E and D take the epoch's steps first and are frozen while G trains)."""
    run.agent.tokenizer.eval()
    if epoch <= getattr(run.config, f"start_{name}_after_epochs"):
        return {}
    getattr(run.agent, name).train()
    compute_loss = tokenizer_loss if name == "tokenizer" else world_model_loss
    metrics = train_steps(run, name, lambda: compute_loss(run))
    run.agent.tokenizer.eval()
    return metrics


def update_behavior(run: Run, epoch: int) -> dict[str, float]:
    """Algorithm 1, update_behavior: imagine H steps from real frames (after burn-in), update π and V (App. B)."""
    if epoch <= run.config.start_actor_critic_after_epochs:
        return {}
    agent = run.agent
    agent.tokenizer.eval()
    agent.world_model.eval()
    agent.actor_critic.train()
    wm_env = WorldModelEnv(agent.tokenizer, agent.world_model)
    return train_steps(run, "actor_critic", lambda: behavior_loss(run, wm_env))


def tokenizer_loss(run: Run) -> dict[str, torch.Tensor]:
    """Appendix A.1 on a batch of frames drawn uniformly from D."""
    return run.agent.tokenizer.loss(run.replay.sample_frames(run.config.tokenizer_batch_size, device=run.agent.device))


def world_model_loss(run: Run) -> dict[str, torch.Tensor]:
    """Eqs. (1)-(3) on B segments of L real steps, encoded by the frozen E."""
    cfg = run.config
    batch = run.replay.sample(
        cfg.world_model_batch_size, cfg.world_model.max_timesteps, sample_from_start=True, device=run.agent.device
    )
    obs_tokens = segment_tokens(run, batch)  # z_t, (B, L, K)
    return run.agent.world_model.loss(obs_tokens, batch["actions"], batch["rewards"], batch["ends"], batch["mask"])


def behavior_loss(run: Run, wm_env: WorldModelEnv) -> dict[str, torch.Tensor]:
    """Eqs. (4)-(6) on B trajectories imagined from real frames, after a burn-in of their episode's past."""
    ac, device = run.config.actor_critic, run.agent.device
    batch = run.replay.sample(
        run.config.actor_critic_batch_size, ac.burn_in + 1, sample_from_start=False, device=device
    )
    tokens = segment_tokens(run, batch)  # z of the burn-in frames and of x_0, (B, burn_in + 1, K)
    out = imagine(
        run.agent.actor_critic, wm_env, batch["observations"], batch["mask"], ac.imagination_horizon, tokens=tokens
    )
    return actor_critic_loss(out, ac)


def train_steps(run: Run, name: str, compute_loss: Callable[[], dict[str, torch.Tensor]]) -> dict[str, float]:
    """`training_steps_per_epoch` Adam steps of one component, gradient norm clipped (Table 5)."""
    module, optimizer = getattr(run.agent, name), run.optimizers[name]
    sums: dict[str, torch.Tensor] = {}
    steps = run.config.training_steps_per_epoch
    for _ in tqdm(range(steps), desc=name, leave=False, disable=None):
        with run.agent.autocast():  # forward passes only: backward runs each op in its forward's dtype
            losses = compute_loss()
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), run.config.max_grad_norm)
        optimizer.step()
        for key, value in losses.items():  # summed on the device: no host sync per step
            sums[key] = sums.get(key, 0.0) + value.detach()
    return {f"{name}/{key}": float(value) / steps for key, value in sums.items()}


@torch.no_grad()
def encode_dataset(run: Run, epoch: int) -> torch.Tensor | None:
    """z_t = E(x_t) for every stored frame, (len(replay), K), when this epoch trains G or (π, V) and cache_tokens
    is on; else None (segments are then encoded batch by batch)."""
    cfg, tokenizer = run.config, run.agent.tokenizer
    if not cfg.cache_tokens or epoch <= min(cfg.start_world_model_after_epochs, cfg.start_actor_critic_after_epochs):
        return None
    frames, size = run.replay.observations, cfg.encode_batch_size  # (N_steps, 3, 64, 64) uint8
    with run.agent.autocast():
        chunks = [tokenizer.encode(frames[i : i + size].to(run.agent.device)) for i in range(0, len(frames), size)]
    return torch.cat(chunks)


@torch.no_grad()
def segment_tokens(run: Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens of a sampled segment, (B, T, K): looked up in this epoch's cache, or encoded now."""
    if run.tokens is None:
        return run.agent.tokenizer.encode(batch["observations"])
    # Padded steps read step 0's tokens instead of E(black frame): the mask keeps them out of every loss.
    return run.tokens[batch["index"].to(run.tokens.device)]


# ---------------------------------------------------------------------------------------------------------------
# Evaluation, media and the epoch's line


def evaluate_agent(run: Run, num_episodes: int) -> dict[str, Any]:
    """Test episodes (Agent.play_test_episodes); the next collection burns its LSTM state in again."""
    returns = run.agent.play_test_episodes(num_episodes, seed=run.config.seed + EVAL_SEED_OFFSET + run.epoch)
    return {"eval/return": float(np.mean(returns)), "eval/returns": [float(r) for r in returns]}


@torch.no_grad()
def save_media(run: Run, epoch: int) -> None:
    """A PNG of real frames above their reconstructions, and a GIF of imagined trajectories (Figure 4 style)."""
    import torchvision.utils

    agent, n, ac = run.agent, run.config.media_trajectories, run.config.actor_critic
    agent.eval()
    media = run.run_dir / "media"
    media.mkdir(exist_ok=True)
    frames = run.replay.sample_frames(MEDIA_FRAMES, device=agent.device)  # (8, 3, 64, 64) uint8
    grid = torch.cat([frames.float() / 255, agent.tokenizer.encode_decode(frames)])
    torchvision.utils.save_image(grid, media / f"reconstructions_epoch{epoch:04d}.png", nrow=MEDIA_FRAMES)
    batch = run.replay.sample(n, ac.burn_in + 1, sample_from_start=False, device=agent.device)
    wm_env = WorldModelEnv(agent.tokenizer, agent.world_model)
    out = imagine(agent.actor_critic, wm_env, batch["observations"], batch["mask"], ac.imagination_horizon)
    frames = (out.frames * 255).round().to(torch.uint8)  # x̂_0..x̂_H, (n, H + 1, 3, 64, 64)
    video = figure4_video(frames, out.rewards, out.ends, MEDIA_BORDER)  # (H + 1, 68, n * 68, 3)
    write_video(video, media / f"imagination_epoch{epoch:04d}.gif", fps=1000 / MEDIA_GIF_MS)


def summary_line(metrics: dict[str, Any]) -> str:
    """The epoch's line on stdout: SUMMARY_KEYS (metrics.csv has every metric) and the epoch's seconds."""
    parts = [f"epoch {metrics['epoch']}"] + [f"{k} {metrics[k]:.4g}" for k in SUMMARY_KEYS if k in metrics]
    seconds = sum(v for k, v in metrics.items() if k.startswith("time/"))
    return " | ".join(parts + [f"{seconds:.0f} s"])


# ---------------------------------------------------------------------------------------------------------------
# Run directory: config.json, metrics.csv, checkpoint.pt and replay/, all written atomically, locked, never mixed


LOCK_FILE = ".lock"  # flock-ed by the process writing the run, which writes its PID in it
FINAL_EVAL = "final_eval.json"  # written at the end of the last epoch: the run is complete
SCHEDULE_FIELDS = ("epochs", "collection_epochs")  # the fields --resume may change: a finished run goes on


def stop_line(run: Run | None, resumed: str | None) -> str:
    """The one line printed on a stop: the last complete epoch and how to go on."""
    name, saved = signal.Signals(STOP["signal"]).name, run.epoch if run else 0
    if not (saved or resumed):
        return f"{name}: stopped before the first epoch was saved; nothing to resume (start again with --overwrite)"
    done = f"epoch {saved} of {run.config.epochs} is the last complete one" if run else "the run is unchanged"
    where = run.run_dir if run else resumed
    return f"{name}: stopped; {done} (the epoch in progress is lost); resume with: python train.py --resume {where}"


def save_run(run: Run) -> None:
    """The new steps of the dataset first, then the checkpoint that names its size (a kill between loses nothing),
    then metrics.csv: a row per epoch, a column per metric (lists such as eval/returns stay in the checkpoint)."""
    run.replay.save(run.run_dir / "replay")
    state = {"epoch": run.epoch, "env_steps": len(run.replay), "history": run.history, "rng": rng_states()}
    state["optimizers"] = {name: optimizer.state_dict() for name, optimizer in run.optimizers.items()}
    atomic_save(run.agent.checkpoint_dict(**state), run.run_dir / CHECKPOINT, previous=run.run_dir / PREVIOUS)
    columns = dict.fromkeys(k for row in run.history for k, v in row.items() if not isinstance(v, list))
    write_csv(run.run_dir / "metrics.csv", run.history, list(columns))


def open_run_dir(run_dir: Path, fresh: bool, overwrite: bool = False) -> None:
    """Lock run_dir for the life of this process (an flock, which dies with the process: a kill -9 leaves no stale
    lock); a fresh run refuses a folder that holds files unless overwrite clears it; remove a killed save's *.tmp."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(lock, 32).decode().strip() or "unknown"
        os.close(lock)
        raise RuntimeError(f"{run_dir} is in use by another train.py (PID {pid}); wait for it to end or stop it")
    old = [path for path in run_dir.iterdir() if path.name != LOCK_FILE]
    if fresh and old and not (overwrite and (run_dir / "config.json").is_file()):  # never clear a foreign folder
        os.close(lock)
        raise RuntimeError(
            f"{run_dir} holds files but no run (no config.json): choose a new --out"
            if overwrite
            else f"{run_dir} already holds a run: continue it with --resume {run_dir}, or choose a new "
            "--out (--overwrite deletes its files and starts afresh there)"
        )
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())  # the lock stays held: this descriptor is never closed
    stale = old if fresh else list(run_dir.rglob("*.tmp"))
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if stale:
        what = "files of the old run" if fresh else "temporary files of a killed save"
        print(f"removed {len(stale)} {what} in {run_dir}")


def new_run(config: IRISConfig, overwrite: bool = False) -> Run:
    config.game = canonical_game(config.game)
    run_dir = Path(config.out or f"runs/{config.game}-{time.strftime('%Y%m%d-%H%M%S')}")
    open_run_dir(run_dir, fresh=True, overwrite=overwrite)
    set_seed(config.seed)
    env = make_env(config.game, train=True, seed=config.seed, config=config.env)
    agent = Agent(config, int(env.action_space.n), pick_device(config.device))
    if config.tokenizer.perceptual_weight > 0:
        agent.tokenizer.perceptual_net()  # fail now, not at epoch 6, if VGG16's weights cannot be had
    write_json(run_dir / "config.json", asdict(config))
    replay = ReplayBuffer(agent.actor_critic.frame_shape, device=agent.device)  # x_t: (3, h, w) uint8
    run = Run(config, agent, agent.make_optimizers(), replay, run_dir, env=env)
    run.obs, _ = env.reset(seed=config.seed)
    return run


def resume_run(run_dir: Path, overrides: dict[str, Any] | None = None) -> Run | None:
    """Continue from the last complete epoch: same config, dataset, weights, optimiser and RNG states. None when the
    run is complete. overrides: device (this process only) and SCHEDULE_FIELDS (recorded in the run at once)."""
    overrides = overrides or {}
    if not (run_dir / CHECKPOINT).is_file() and not (run_dir / PREVIOUS).is_file():
        raise FileNotFoundError(
            f"nothing to resume in {run_dir}: it holds no {CHECKPOINT} (train.py writes one at the end of every epoch)"
        )
    open_run_dir(run_dir, fresh=False)
    checkpoint = load_run_checkpoint(run_dir)
    config = extend_run(run_dir, checkpoint, {k: v for k, v in overrides.items() if k in SCHEDULE_FIELDS})
    if checkpoint["epoch"] >= config.epochs and (run_dir / FINAL_EVAL).is_file():
        print(
            f"{run_dir}: the run is complete ({config.epochs} epochs, {FINAL_EVAL} written); nothing to do "
            f"(to go on: python train.py --resume {run_dir} --epochs N)"
        )
        return None
    agent = Agent.from_checkpoint(checkpoint, pick_device(overrides.get("device", config.device)))
    # A kill between saving the dataset and the checkpoint, or a fallback to PREVIOUS, leaves steps the checkpoint
    # never saw: not read, and overwritten by the next save.
    replay = ReplayBuffer.load(run_dir / "replay", device=agent.device, num_steps=checkpoint["env_steps"])
    replay.close_episode()  # the emulator's state is not saved: collection restarts with a new game
    optimizers = agent.make_optimizers()
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(checkpoint["optimizers"][name])
    set_rng_states(checkpoint["rng"])
    seed = config.seed + checkpoint["epoch"]  # a new game: other no-op starts than the epoch before
    env = make_env(config.game, train=True, seed=seed, config=config.env)
    run = Run(agent.config, agent, optimizers, replay, run_dir, checkpoint["epoch"], checkpoint["history"], env=env)
    run.obs, _ = env.reset(seed=seed)
    return run


def extend_run(run_dir: Path, checkpoint: dict[str, Any], schedule: dict[str, Any]) -> IRISConfig:
    """The run's config: the checkpoint's, with the new schedule fields if any (written into the checkpoint and
    config.json before anything trains). An edited config.json is rewritten from the checkpoint, with a warning."""
    before = checkpoint["config"]
    config = config_from_checkpoint(checkpoint, schedule)
    edited = config_json_edits(run_dir / "config.json", before)
    changed = differing_keys(asdict(config), before)
    if changed:
        if (run_dir / FINAL_EVAL).is_file():  # the old end's evaluation, kept under its epoch's name
            os.replace(run_dir / FINAL_EVAL, run_dir / f"final_eval_epoch{checkpoint['epoch']:04d}.json")
        checkpoint["config"] = asdict(config)
        with deferred_signals():  # no rotation: PREVIOUS stays the epoch before
            atomic_save(checkpoint, run_dir / CHECKPOINT)
        print("extended the run: " + ", ".join(f"{k} {before[k]} -> {getattr(config, k)}" for k in changed))
    if edited:
        print(
            f"warning: config.json differs from {CHECKPOINT}'s config ({edited}); the checkpoint's config is the "
            "run's: config.json is rewritten from it (--resume DIR --epochs N changes the schedule)",
            file=sys.stderr,
        )
    if edited or changed:
        write_json(run_dir / "config.json", asdict(config))
    return config


# ---------------------------------------------------------------------------------------------------------------
# Command line: one flag per config field (nested ones as --tokenizer.vocab_size), presets, resume


def parse_args(argv: list[str] | None = None) -> tuple[IRISConfig | None, argparse.Namespace]:
    usage = "%(prog)s [--resume RUN_DIR] [--overwrite] [--preset NAME] [--FIELD VALUE ...]"
    parser = CLIParser(usage=usage, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its checkpoint.pt (--epochs N: a longer run)"
    )
    parser.add_argument("--overwrite", action="store_true", help="delete the files of the run at --out, start afresh")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    if args.resume:
        unknown = set(config_overrides(args)) - {"device", *SCHEDULE_FIELDS}
        unknown |= {name for name in ("overwrite", "preset") if getattr(args, name) not in (False, "paper")}
        if unknown:
            parser.error(
                f"--resume continues a run with its stored config, changing only --device, --epochs and "
                f"--collection_epochs; drop {', '.join('--' + name for name in sorted(unknown))}"
            )
        return None, args
    return config_from_args(args), args


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    run = None
    try:
        if config is not None:
            validate_config(config)  # before anything is written
        catch_stop_signals()
        run = resume_run(Path(args.resume), config_overrides(args)) if args.resume else new_run(config, args.overwrite)
        if run is None:  # a complete run: nothing to do
            return
        setup_process(run.config, run.agent.device)
        if warning := cpu_time_warning(run.config, run.agent.device, run.epoch):
            print(warning, file=sys.stderr, flush=True)
        print(f"run directory: {run.run_dir} | game {run.config.game} | {run.agent.describe()}")
        training_loop(run)
    except BaseException as error:
        if STOP["signal"] is not None:  # the stop, or an error it caused (in an env worker it ended)
            print(stop_line(run, args.resume), file=sys.stderr)
            sys.exit(128 + STOP["signal"])
        if run is None and isinstance(error, ValueError | FileNotFoundError | RuntimeError):
            sys.exit(f"error: {error}")
        raise


if __name__ == "__main__":
    main()
