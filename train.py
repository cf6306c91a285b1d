"""IRIS training: Algorithm 1 of Appendix D, with the hyperparameters of Tables 2-6 (Appendix A).

    python train.py --game Pong                  # the paper's agent (a GPU run of days)
    python train.py --game Pong --preset tiny    # every phase in minutes on a laptop CPU
    python train.py --resume runs/Pong-...       # continue a killed run from its last epoch

Each epoch (Algorithm 1, training_loop): collect_experience in the real environment with the current
policy, update_world_model (the discrete autoencoder (E, D), then the Transformer G), update_behavior
(the actor-critic, purely in imagination). Components start after the warm-up delays of Table 5.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from actor_critic import ActorCritic, ActorCriticConfig, actor_critic_loss, imagine
from env import EnvConfig, canonical_game, make_env, run_episodes
from replay import ReplayBuffer, atomic_save
from tokenizer import Tokenizer, TokenizerConfig
from world_model import WorldModel, WorldModelConfig, WorldModelEnv


@dataclass
class IRISConfig:
    """Every hyperparameter of the agent and of Algorithm 1. Defaults are the paper's (Tables 2-6)."""

    game: str = "Pong"  # any Atari game of ale-py; the paper's 26 are env.ATARI_100K_GAMES
    seed: int = 0  # seeds python, numpy, torch and the environments
    device: str = "auto"  # auto: cuda, then mps, then cpu
    out: str = ""  # run directory; empty: runs/<game>-<time>
    # Training loop, Table 5
    epochs: int = 600  # Epochs
    collection_epochs: int = 500  # # Collection epochs
    env_steps_per_epoch: int = 200  # Environment steps per epoch (600 x 200 - 100 x 200 = 100k steps)
    training_steps_per_epoch: int = 200  # Training steps per epoch, for each component
    collect_epsilon: float = 0.01  # Collection epsilon-greedy
    collect_temperature: float = 1.0  # Collection samples from the policy as is (Appendix H)
    eval_temperature: float = 0.5  # Eval sampling temperature
    start_tokenizer_after_epochs: int = 5  # Start autoencoder after epochs
    start_world_model_after_epochs: int = 25  # Start transformer after epochs
    start_actor_critic_after_epochs: int = 50  # Start actor-critic after epochs
    tokenizer_batch_size: int = 256  # Autoencoder batch size (frames)
    world_model_batch_size: int = 64  # Transformer batch size (segments of L steps)
    actor_critic_batch_size: int = 64  # Actor-critic batch size (imagined trajectories)
    learning_rate: float = 1e-4  # Learning rate (Adam, all three components)
    adam_beta1: float = 0.9  # Adam β1
    adam_beta2: float = 0.999  # Adam β2
    max_grad_norm: float = 10.0  # Max gradient norm
    # Evaluation (Section 3.2): test episodes with no end on life loss, ε = 0
    eval_every: int = 5  # epochs between evaluations during training (the reference code's value)
    eval_episodes: int = 16  # episodes per evaluation during training (the reference code's value)
    final_eval_episodes: int = 100  # Section 3.2: "an average over 100 episodes collected at the end of training"
    eval_envs: int = 8  # test environments stepping in parallel
    media_trajectories: int = 4  # imagined trajectories in the GIF of each evaluation
    # Speed, with no change to the algorithm (bf16 changes rounding only); README "Speed" has the measurements
    cache_tokens: bool = True  # E is frozen after its steps of the epoch: encode every stored frame once, reuse z
    encode_batch_size: int = 1024  # frames per tokenizer call when encoding the dataset
    bf16: str = "cuda"  # bf16 autocast of every forward pass: "cuda" (on GPUs only), "always" (CPUs too), "never"
    fused_adam: bool = True  # Adam's fused kernel (CUDA and CPU): one pass over all parameters, same update
    channels_last: bool = False  # NHWC layout for the convolutions of E, D and π/V (slower on this CPU: see README)
    reuse_freed_memory: bool = True  # CPU: glibc malloc keeps freed pages of big tensors (see reuse_freed_memory)
    # Components
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # Tables 2-3, Appendix A.1
    world_model: WorldModelConfig = field(default_factory=WorldModelConfig)  # Table 4, Appendix A.2
    actor_critic: ActorCriticConfig = field(default_factory=ActorCriticConfig)  # Table 6, Appendix A.3
    env: EnvConfig = field(default_factory=EnvConfig)  # Atari 100k protocol, Section 3.1


# Presets in the minGPT manner: "paper" is the dataclass defaults; "tiny" shrinks models, batches, epochs and
# delays so that all three phases run in minutes on a 2-core CPU. The code path is the same.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "tiny": {
        "epochs": 10, "collection_epochs": 10, "env_steps_per_epoch": 100, "training_steps_per_epoch": 24,
        "start_tokenizer_after_epochs": 1, "start_world_model_after_epochs": 3, "start_actor_critic_after_epochs": 5,
        "tokenizer_batch_size": 32, "world_model_batch_size": 8, "actor_critic_batch_size": 8,
        "learning_rate": 1e-3, "eval_every": 5, "eval_episodes": 2, "final_eval_episodes": 2, "eval_envs": 2,
        "media_trajectories": 2,
        # No perceptual term: it needs VGG16's ImageNet weights (a download) and dominates CPU time.
        "tokenizer.ch": 16, "tokenizer.num_res_blocks": 1, "tokenizer.attn_resolutions": (),
        "tokenizer.z_channels": 32, "tokenizer.vocab_size": 64, "tokenizer.embed_dim": 32,
        "tokenizer.perceptual_weight": 0.0,
        "world_model.max_timesteps": 4, "world_model.embed_dim": 64, "world_model.num_layers": 2,
        "world_model.num_heads": 2,
        "actor_critic.conv_channels": (8, 8, 16, 16), "actor_critic.lstm_dim": 64, "actor_critic.burn_in": 4,
        "actor_critic.imagination_horizon": 4,
    },
}


# ---------------------------------------------------------------------------------------------------------------
# The agent: the world model (E, D, G) and the policy π with its value V


class Agent(torch.nn.Module):
    """Tokenizer (E, D), world model G and actor-critic (π, V), with `act`, `save` and `load` for research code."""

    def __init__(self, config: IRISConfig, num_actions: int, device: str | torch.device = "cpu"):
        super().__init__()
        self.config, self.num_actions = config, num_actions
        self.tokenizer = Tokenizer(config.tokenizer)
        tokens = dict(vocab_size=config.tokenizer.vocab_size, tokens_per_frame=config.tokenizer.tokens_per_frame)
        self.world_model = WorldModel(config.world_model, num_actions=num_actions, **tokens)
        self.actor_critic = ActorCritic(config.actor_critic, num_actions)
        if config.bf16 not in BF16_MODES:
            raise ValueError(f"bf16 must be one of {', '.join(BF16_MODES)}, got {config.bf16!r}")
        self.to(device)
        if config.channels_last:  # copies keep this layout: load_state_dict writes into these tensors
            self.tokenizer.to(memory_format=torch.channels_last)
            self.actor_critic.to(memory_format=torch.channels_last)
        if self.device.type == "cpu" and config.reuse_freed_memory:
            reuse_freed_memory()
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None  # LSTM state (h, c) of the episodes being played

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def autocast(self) -> torch.autocast:
        """bf16 autocast for forward passes, where config.bf16 asks for it on this device; else a no-op."""
        enabled = self.config.bf16 == "always" or (self.config.bf16 == "cuda" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def act(self, obs: np.ndarray, first: np.ndarray, temperature: float = 1.0, epsilon: float = 0.0) -> np.ndarray:
        """Actions for n real environments. obs (n, 64, 64, 3) uint8; first (n,) True where an episode starts."""
        frames = torch.as_tensor(obs, device=self.device).permute(0, 3, 1, 2)  # (n, 3, 64, 64)
        first_t = torch.as_tensor(first, device=self.device, dtype=torch.bool)
        if self.state is None or self.state[0].shape[0] != len(obs):
            self.state = self.actor_critic.initial_state(len(obs), self.device)
        self.state = self.actor_critic.reset_state(self.state, first_t)  # the LSTM state follows the episode
        with self.autocast():
            actions, self.state = self.actor_critic.act(frames, self.state, self.tokenizer, temperature, epsilon)
        return actions.cpu().numpy()

    def save(self, path: str | Path, **extra: Any) -> None:
        """Atomically write the weights and the config they need (VGG is never saved: it is not ours to train)."""
        atomic_save(self.checkpoint_dict(**extra), path)

    def checkpoint_dict(self, **extra: Any) -> dict[str, Any]:
        return {"config": asdict(self.config), "game": self.config.game, "num_actions": self.num_actions,
                "agent": {name: getattr(self, name).state_dict() for name in COMPONENTS}, **extra}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> Agent:
        """Rebuild an agent from a checkpoint alone (its stored config), e.g. `Agent.load("runs/x/checkpoint.pt")`."""
        return cls.from_checkpoint(load_checkpoint(path), device)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], device: str | torch.device | None = None) -> Agent:
        """The agent of a checkpoint dict already read (by load_checkpoint), in eval mode."""
        agent = cls(config_from_dict(checkpoint["config"]), checkpoint["num_actions"], device or pick_device("auto"))
        for name in COMPONENTS:
            getattr(agent, name).load_state_dict(checkpoint["agent"][name])
        return agent.eval()


COMPONENTS = ("tokenizer", "world_model", "actor_critic")
BF16_MODES = ("cuda", "always", "never")
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
EVAL_SEED_OFFSET = 10_000  # test envs draw other no-op starts than the training env's seeds
MEDIA_FRAMES = 8  # real frames (and their reconstructions) in each PNG
MEDIA_BORDER = 2  # pixels of the Figure 4-style colour frame around each imagined frame
MEDIA_GIF_MS = 200  # milliseconds per imagined step in the GIF


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: give a run directory holding checkpoint.pt "
                                "(written by train.py every epoch) or the path of a .pt checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise RuntimeError(f"{path} is corrupt or not a checkpoint ({error}); "
                           "delete it and resume from an earlier copy, or start a new run") from error
    if not isinstance(checkpoint, dict) or not {"config", "num_actions", "agent"} <= checkpoint.keys():
        raise RuntimeError(f"{path} is not an iris checkpoint (it lacks config, num_actions or agent weights)")
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1 (Appendix D)


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


def training_loop(run: Run) -> None:
    """Algorithm 1: for each epoch, collect_experience, update_world_model, update_behavior."""
    cfg = run.config
    for epoch in range(run.epoch + 1, cfg.epochs + 1):
        metrics: dict[str, float] = {"epoch": epoch}
        start = time.perf_counter()
        if epoch <= cfg.collection_epochs:
            metrics.update(collect_experience(run, cfg.env_steps_per_epoch))
        metrics["time/collect"] = time.perf_counter() - start
        start = time.perf_counter()
        metrics.update(update_world_model(run, epoch))
        metrics["time/world_model"] = time.perf_counter() - start
        start = time.perf_counter()
        metrics.update(update_behavior(run, epoch))
        metrics["time/behavior"] = time.perf_counter() - start
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            start = time.perf_counter()
            metrics.update(evaluate_agent(run, cfg.eval_episodes))
            save_media(run, epoch)
            metrics["time/eval"] = time.perf_counter() - start
        metrics["env_steps"] = len(run.replay)
        run.epoch = epoch
        run.history.append(metrics)
        save_run(run)
        print(summary_line(metrics), flush=True)
    final = evaluate_agent(run, cfg.final_eval_episodes)
    with open(run.run_dir / "final_eval.json", "w") as f:
        json.dump({"game": cfg.game, "episodes": cfg.final_eval_episodes, "env_steps": len(run.replay),
                   "mean_return": final["eval/return"], "returns": final["eval/returns"]}, f, indent=2)
    print(f"final evaluation over {cfg.final_eval_episodes} episodes: mean return {final['eval/return']:.2f}")


def collect_experience(run: Run, n: int) -> dict[str, float]:
    """Algorithm 1, collect_experience(n): act with π on x̂_t = D(E(x_t)) and add {x_t, a_t, r_t, d_t} to D."""
    cfg, agent = run.config, run.agent
    agent.eval()
    returns, episode_return = [], 0.0
    for _ in tqdm(range(n), desc="collect", leave=False, disable=None):
        action = agent.act(run.obs[None], np.array([run.first]), cfg.collect_temperature, cfg.collect_epsilon)[0]
        next_obs, reward, terminated, truncated, _ = run.env.step(action)
        run.replay.add(run.obs, int(action), float(reward), bool(terminated), bool(truncated))
        episode_return += float(reward)
        run.obs, run.first = next_obs, False
        if terminated or truncated:
            returns.append(episode_return)
            episode_return = 0.0
            run.obs, _ = run.env.reset()
            run.first = True
    return {"collect/return": float(np.mean(returns))} if returns else {}


def update_world_model(run: Run, epoch: int) -> dict[str, float]:
    """Algorithm 1, update_world_model: train (E, D) on frames, then G on segments encoded by the frozen E.

    As in the reference code, the tokenizer takes its steps of the epoch first and is frozen while G trains.
    """
    cfg, agent, metrics = run.config, run.agent, {}
    if epoch > cfg.start_tokenizer_after_epochs:
        agent.tokenizer.train()
        metrics.update(train_steps(run, "tokenizer", lambda: agent.tokenizer.loss(
            run.replay.sample_frames(cfg.tokenizer_batch_size, device=agent.device))))
    agent.tokenizer.eval()
    uses_tokens = epoch > min(cfg.start_world_model_after_epochs, cfg.start_actor_critic_after_epochs)
    with agent.autocast():
        run.tokens = encode_dataset(agent.tokenizer, run.replay, cfg.encode_batch_size) if (
            cfg.cache_tokens and uses_tokens) else None
    if epoch > cfg.start_world_model_after_epochs:
        agent.world_model.train()
        metrics.update(train_steps(run, "world_model", lambda: world_model_loss(run)))
    return metrics


def world_model_loss(run: Run) -> dict[str, torch.Tensor]:
    """Eqs. (1)-(3) on B segments of L real steps, encoded by the frozen E."""
    cfg = run.config
    batch = run.replay.sample(cfg.world_model_batch_size, cfg.world_model.max_timesteps, sample_from_start=True,
                              device=run.agent.device)
    obs_tokens = segment_tokens(run, batch)  # z_t, (B, L, K)
    return run.agent.world_model.loss(obs_tokens, batch["actions"], batch["rewards"], batch["ends"], batch["mask"])


def update_behavior(run: Run, epoch: int) -> dict[str, float]:
    """Algorithm 1, update_behavior: imagine H steps from real frames (after burn-in), update π and V (App. B)."""
    cfg, agent = run.config, run.agent
    if epoch <= cfg.start_actor_critic_after_epochs:
        return {}
    agent.tokenizer.eval()
    agent.world_model.eval()
    agent.actor_critic.train()
    wm_env = WorldModelEnv(agent.tokenizer, agent.world_model)
    return train_steps(run, "actor_critic", lambda: behavior_loss(run, wm_env))


def behavior_loss(run: Run, wm_env: WorldModelEnv) -> dict[str, torch.Tensor]:
    """Eqs. (4)-(6) on B trajectories imagined from real frames, after a burn-in of their episode's past."""
    cfg, ac_cfg = run.config, run.config.actor_critic
    batch = run.replay.sample(cfg.actor_critic_batch_size, ac_cfg.burn_in + 1, sample_from_start=False,
                              device=run.agent.device)
    out = imagine(run.agent.actor_critic, wm_env, batch["observations"], batch["mask"], ac_cfg.imagination_horizon,
                  tokens=segment_tokens(run, batch))
    return actor_critic_loss(out, ac_cfg)


@torch.no_grad()
def encode_dataset(tokenizer: Tokenizer, replay: ReplayBuffer, batch_size: int) -> torch.Tensor:
    """z_t = E(x_t) for every stored frame, (len(replay), K): encode once, use for every batch of the epoch."""
    frames = replay.observations  # (N_steps, 3, 64, 64) uint8
    device = tokenizer.embedding.weight.device
    chunks = [tokenizer.encode(frames[i:i + batch_size].to(device)) for i in range(0, len(frames), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def segment_tokens(run: Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens of a sampled segment, (B, T, K): looked up in this epoch's cache, or encoded now."""
    if run.tokens is None:
        return run.agent.tokenizer.encode(batch["observations"])
    # Padded steps read step 0's tokens instead of E(black frame): the mask keeps them out of every loss.
    return run.tokens[batch["index"].to(run.tokens.device)]


def train_steps(run: Run, name: str, compute_loss) -> dict[str, float]:
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


def make_optimizers(agent: Agent, cfg: IRISConfig) -> dict[str, torch.optim.Optimizer]:
    """Adam for E, D and for π, V; AdamW with weight decay on G's Linear weights only (Table 4)."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    fused = cfg.fused_adam and agent.device.type in ("cuda", "cpu")  # where torch has the fused kernel
    adam = {"lr": cfg.learning_rate, "betas": betas, "fused": fused or None}
    return {
        "tokenizer": torch.optim.Adam(agent.tokenizer.parameters(), **adam),
        "world_model": agent.world_model.configure_optimizer(cfg.learning_rate, betas, fused),
        "actor_critic": torch.optim.Adam(agent.actor_critic.parameters(), **adam),
    }


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and media


def evaluate_agent(run: Run, num_episodes: int) -> dict[str, Any]:
    """Test episodes (no end on life loss, ε = 0, temperature of Table 5) in parallel environments."""
    cfg, agent = run.config, run.agent
    agent.eval()
    agent.state = None

    def policy(obs: np.ndarray, first: np.ndarray) -> np.ndarray:
        return agent.act(obs, first, cfg.eval_temperature, epsilon=0.0)

    returns = run_episodes(cfg.game, policy, num_episodes, num_envs=min(cfg.eval_envs, num_episodes),
                           seed=cfg.seed + EVAL_SEED_OFFSET + run.epoch, train=False, config=cfg.env)
    agent.state = None  # the next collection step starts a fresh LSTM state for its episode
    run.first = True
    return {"eval/return": float(np.mean(returns)), "eval/returns": [float(r) for r in returns]}


@torch.no_grad()
def save_media(run: Run, epoch: int) -> None:
    """A PNG of real frames above their reconstructions, and a GIF of imagined trajectories (Figure 4 style)."""
    import torchvision.utils
    from PIL import Image

    agent, n = run.agent, run.config.media_trajectories
    agent.eval()
    media = run.run_dir / "media"
    media.mkdir(exist_ok=True)
    frames = run.replay.sample_frames(MEDIA_FRAMES, device=agent.device)  # (8, 3, 64, 64) uint8
    grid = torch.cat([frames.float() / 255, agent.tokenizer.encode_decode(frames)])
    torchvision.utils.save_image(grid, media / f"reconstructions_epoch{epoch:04d}.png", nrow=MEDIA_FRAMES)
    ac_cfg = run.config.actor_critic
    batch = run.replay.sample(n, ac_cfg.burn_in + 1, sample_from_start=False, device=agent.device)
    out = imagine(agent.actor_critic, WorldModelEnv(agent.tokenizer, agent.world_model), batch["observations"],
                  batch["mask"], ac_cfg.imagination_horizon)
    frames = (out.frames * 255).round().to(torch.uint8)  # x̂_0..x̂_H, (n, H + 1, 3, 64, 64)
    # Figure 4: yellow border where a reward is predicted on the step into the frame, red where an end is.
    border = torch.zeros(n, frames.shape[1], 3, dtype=torch.uint8, device=frames.device)
    border[:, 1:][out.rewards > 0] = torch.tensor([255, 215, 0], dtype=torch.uint8, device=frames.device)
    border[:, 1:][out.ends > 0] = torch.tensor([220, 0, 0], dtype=torch.uint8, device=frames.device)
    b, size = MEDIA_BORDER, frames.shape[-1] + 2 * MEDIA_BORDER
    padded = border[..., None, None].expand(-1, -1, -1, size, size).clone()  # (n, H + 1, 3, 68, 68)
    padded[..., b:size - b, b:size - b] = frames
    rows = padded.permute(1, 3, 0, 4, 2).reshape(frames.shape[1], size, n * size, 3)  # (H + 1, 68, n * 68, 3)
    images = [Image.fromarray(image) for image in rows.cpu().numpy()]
    images[0].save(media / f"imagination_epoch{epoch:04d}.gif", save_all=True, append_images=images[1:],
                   duration=MEDIA_GIF_MS, loop=0)


def summary_line(metrics: dict[str, Any]) -> str:
    keys = ["env_steps", "collect/return", "tokenizer/reconstruction", "world_model/transition",
            "world_model/reward", "actor_critic/value", "actor_critic/imagined_return", "eval/return"]
    parts = [f"epoch {metrics['epoch']}"] + [f"{k} {metrics[k]:.4g}" for k in keys if k in metrics]
    seconds = sum(v for k, v in metrics.items() if k.startswith("time/"))
    return " | ".join(parts + [f"{seconds:.0f} s"])


# ---------------------------------------------------------------------------------------------------------------
# Run directory: config.json, metrics.csv, checkpoint.pt and replay.pt, all written atomically


def save_run(run: Run) -> None:
    """The dataset first, then the checkpoint that names its size: a kill between the two loses nothing."""
    run.replay.save(run.run_dir / "replay.pt")
    extra = {"epoch": run.epoch, "env_steps": len(run.replay), "history": run.history, "rng": rng_states(),
             "optimizers": {name: opt.state_dict() for name, opt in run.optimizers.items()}}
    run.agent.save(run.run_dir / "checkpoint.pt", **extra)
    write_metrics_csv(run.history, run.run_dir / "metrics.csv")


def write_metrics_csv(history: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in history:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, list)]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def reuse_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for the next large tensor; True if it could (Linux with glibc).

    By default glibc maps every block over 32 MiB afresh (one of D's activations on 64 frames is 64 MiB) and unmaps
    it when freed, so each forward pass page-faults again on every 4 KiB: measured as 40% of D's time on this CPU.
    No block is then mmap-ed and the heap is never trimmed: the process keeps its peak memory, and runs faster.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # another C library (musl) has no mallopt
        return False


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but this torch build sees no CUDA device; "
                         "use --device cpu or --device auto")
    return torch.device(name)


def new_run(config: IRISConfig) -> Run:
    config.game = canonical_game(config.game)
    set_seed(config.seed)
    env = make_env(config.game, train=True, seed=config.seed, config=config.env)
    agent = Agent(config, int(env.action_space.n), pick_device(config.device))
    if config.tokenizer.perceptual_weight > 0:
        agent.tokenizer.perceptual_net()  # fail now, not at epoch 6, if VGG16's weights cannot be had
    run_dir = Path(config.out or f"runs/{config.game}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "config.json", "w") as f:
        json.dump(asdict(config), f, indent=2)
    run = Run(config, agent, make_optimizers(agent, config), ReplayBuffer(device=agent.device), run_dir, env=env)
    run.obs, _ = env.reset(seed=config.seed)
    return run


def resume_run(run_dir: Path, device: str | None) -> Run:
    """Continue from the last complete epoch: same config, dataset, weights, optimiser and RNG states."""
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume in {run_dir}: it holds no checkpoint.pt "
                                "(train.py writes one at the end of every epoch)")
    checkpoint = load_checkpoint(path)
    config = config_from_dict(checkpoint["config"])
    if device:
        config.device = device
    agent = Agent.from_checkpoint(checkpoint, pick_device(config.device))
    replay = ReplayBuffer.load(run_dir / "replay.pt", device=agent.device)
    # A kill between saving the dataset and the checkpoint leaves steps the checkpoint never saw.
    replay.truncate(checkpoint["env_steps"])
    replay.close_episode()  # the emulator's state is not saved: collection restarts with a new game
    run = Run(config, agent, make_optimizers(agent, config), replay, run_dir, epoch=checkpoint["epoch"],
              history=checkpoint["history"])
    for name, optimizer in run.optimizers.items():
        optimizer.load_state_dict(checkpoint["optimizers"][name])
    set_rng_states(checkpoint["rng"])
    run.env = make_env(config.game, train=True, seed=config.seed + run.epoch, config=config.env)
    run.obs, _ = run.env.reset(seed=config.seed + run.epoch)
    return run


# ---------------------------------------------------------------------------------------------------------------
# Command line: one flag per config field (nested ones as --tokenizer.vocab_size), presets, resume


def config_from_dict(values: dict[str, Any]) -> IRISConfig:
    """Rebuild a config from `asdict` output (JSON turns tuples into lists: give them back their type)."""

    def build(cls, data: dict[str, Any]):
        kwargs = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                value = build(f.default_factory, value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    return build(IRISConfig, values)


def flat_fields(config: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{"tokenizer.vocab_size": (owner dataclass instance, default value), ...} for every leaf field."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_fields(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (config, value)
    return out


def parse_value(text: str, default: Any) -> Any:
    """Convert a flag's text to the type of the field's default, with an error that says what is allowed."""
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    if isinstance(default, tuple):
        items = [item for item in text.replace(" ", "").split(",") if item]
        kind = type(default[0]) if default else int
        return tuple(kind(item) for item in items)
    return type(default)(text)


def set_field(config: IRISConfig, name: str, value: Any) -> None:
    owner = config
    *path, leaf = name.split(".")
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, leaf, value)


def parse_args(argv: list[str] | None = None) -> tuple[IRISConfig | None, argparse.Namespace]:
    defaults = flat_fields(IRISConfig())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="paper (Tables 2-6) or tiny")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint.pt")
    for name, (_, default) in defaults.items():
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default

        def convert(text: str, default: Any = default) -> Any:
            try:
                return parse_value(text, default)
            except ValueError as error:
                raise argparse.ArgumentTypeError(f"expected a {type(default).__name__}: {error}") from error

        parser.add_argument(f"--{name}", type=convert, default=argparse.SUPPRESS, metavar=type(default).__name__,
                            help=f"default {shown}")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in defaults}
    if args.resume:
        unknown = set(overrides) - {"device"}
        if unknown:
            parser.error(f"--resume continues a run with its stored config; drop {', '.join(sorted(unknown))}")
        return None, args
    config = IRISConfig()
    for name, value in {**PRESETS[args.preset], **overrides}.items():
        set_field(config, name, value)
    return config, args


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    try:
        if args.resume:
            run = resume_run(Path(args.resume), getattr(args, "device", None))
        else:
            run = new_run(config)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        sys.exit(f"error: {error}")
    print(f"run directory: {run.run_dir} | game {run.config.game} | device {run.agent.device} | "
          + " | ".join(f"{name} {sum(p.numel() for p in getattr(run.agent, name).parameters()) / 1e6:.2f}M params"
                       for name in COMPONENTS))
    training_loop(run)


if __name__ == "__main__":
    main()
