"""The IRIS agent and what every entry point shares: the config of Tables 2-6 (Appendix A), presets, the Agent
(E, D, G, π, V of Sections 2.1-2.3) with act, test episodes and save/load, checkpoint reading and validation, device
choice (with a warning when a CPU would train for days), stop signals that wait for a save, and the config fields
as command-line flags.

    agent = Agent.load("runs/Pong-.../checkpoint.pt")          # rebuild from a checkpoint alone
    actions = agent.act(frames, first, temperature=0.5)          # frames (n, 64, 64, 3) uint8

train.py runs Algorithm 1 with it; evaluate.py and play.py only need this file and the components below it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import dataclasses
import inspect
import io
import json
import os
import random
import signal
import sys
import textwrap
import tokenize
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import cv2
import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from actor_critic import BOOTSTRAPS, ActorCritic, ActorCriticConfig
from env import EnvConfig, StepHook, run_episodes
from replay import atomic_save
from tokenizer import (
    LPIPS_CHANNELS,
    LPIPS_SCALE,
    LPIPS_SHIFT,
    RECONSTRUCTION_LOSSES,
    VGG16_STAGE_ENDS,
    Downsample,
    ResidualBlock,
    SelfAttention,
    Tokenizer,
    TokenizerConfig,
    Upsample,
)
from world_model import WorldModel, WorldModelConfig


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
    eval_temperature: float = 0.5  # Eval sampling temperature (0: greedy, the argmax action)
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
    channels_last: bool = False  # NHWC layout for the convolutions of E, D and π/V (README, Speed)
    reuse_freed_memory: bool = True  # CPU: glibc malloc keeps freed pages of big tensors (see reuse_freed_memory)
    # Components
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # Tables 2-3, Appendix A.1
    world_model: WorldModelConfig = field(default_factory=WorldModelConfig)  # Table 4, Appendix A.2
    actor_critic: ActorCriticConfig = field(default_factory=ActorCriticConfig)  # Table 6, Appendix A.3
    env: EnvConfig = field(default_factory=EnvConfig)  # Atari 100k protocol, Section 3.1


# Presets in the minGPT manner: "paper" is the dataclass defaults; "tiny" shrinks models, batches, epochs and
# delays so that all three phases run on a laptop CPU (README has the time). The code path is the same.
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "tiny": {
        "epochs": 10, "collection_epochs": 10, "env_steps_per_epoch": 100, "training_steps_per_epoch": 24,
        "start_tokenizer_after_epochs": 1, "start_world_model_after_epochs": 3, "start_actor_critic_after_epochs": 5,
        "tokenizer_batch_size": 32, "world_model_batch_size": 8, "actor_critic_batch_size": 8,
        "learning_rate": 1e-3, "eval_every": 5, "eval_episodes": 2, "final_eval_episodes": 2, "eval_envs": 2,
        "media_trajectories": 2,
        # Half the default: E on the 1,000 stored frames in one call raised the peak RSS by 1.9 GiB; in 512s, by 1.0.
        "encode_batch_size": 512,
        # No perceptual term: it needs VGG16's ImageNet weights (a download) and dominates CPU time.
        "tokenizer.ch": 16, "tokenizer.num_res_blocks": 1, "tokenizer.attn_resolutions": (),
        "tokenizer.z_channels": 32, "tokenizer.vocab_size": 64, "tokenizer.embed_dim": 32,
        "tokenizer.perceptual_weight": 0.0,
        "world_model.max_timesteps": 4, "world_model.embed_dim": 64, "world_model.num_layers": 2,
        "world_model.num_heads": 2,
        "actor_critic.conv_channels": (8, 8, 16, 16), "actor_critic.lstm_dim": 64, "actor_critic.burn_in": 4,
        "actor_critic.imagination_horizon": 4,
    },
    # "small": meant for the whole loop to learn on a 2-core CPU (README "Does it learn?"): 50 epochs
    # of 100 env steps (5k steps, 5% of Atari 100k); narrow models whose channels grow as the resolution falls, so
    # that D's 64x64 layers stay cheap; 30 steps of each component per epoch. Same code path as "paper".
    "small": {
        "epochs": 50, "collection_epochs": 50, "env_steps_per_epoch": 100, "training_steps_per_epoch": 30,
        "start_tokenizer_after_epochs": 1, "start_world_model_after_epochs": 3, "start_actor_critic_after_epochs": 6,
        "tokenizer_batch_size": 32, "world_model_batch_size": 32, "actor_critic_batch_size": 16,
        "learning_rate": 3e-4, "eval_every": 10, "eval_episodes": 8, "final_eval_episodes": 32, "eval_envs": 8,
        "tokenizer.ch": 8, "tokenizer.ch_mult": (1, 2, 4, 8, 8), "tokenizer.num_res_blocks": 1,
        "tokenizer.attn_resolutions": (), "tokenizer.z_channels": 64, "tokenizer.embed_dim": 64,
        "tokenizer.perceptual_weight": 0.0, "tokenizer.reconstruction_loss": "l2",  # no L_perceptual: see README
        "world_model.max_timesteps": 10, "world_model.embed_dim": 128, "world_model.num_layers": 3,
        "world_model.num_heads": 4,  # no dropout in a G this small: on CatchBall it learned 3x slower (README)
        "world_model.embed_dropout": 0.0, "world_model.attn_dropout": 0.0, "world_model.resid_dropout": 0.0,
        "actor_critic.conv_channels": (16, 16, 32, 32), "actor_critic.lstm_dim": 256, "actor_critic.burn_in": 5,
        "actor_critic.imagination_horizon": 10,
    },
}
# fmt: on

COMPONENTS = ("tokenizer", "world_model", "actor_critic")
TEST_EPSILON = 0.0  # no ε-greedy in test episodes (Section 3.2; Table 5's ε = 0.01 is for collection)
BF16_MODES = ("cuda", "always", "never")
CHECKPOINT_KEYS = ("config", "game", "num_actions", "agent")  # what Agent.checkpoint_dict always writes
CHECKPOINT = "checkpoint.pt"  # a run directory's last complete epoch (train.py writes it at the end of every epoch)
PREVIOUS = "checkpoint.prev.pt"  # the epoch before it: resume falls back to it when CHECKPOINT is unreadable
CORRUPT = "checkpoint.corrupt.pt"  # an unreadable CHECKPOINT, kept aside for inspection after a fallback
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked, with a message that says what to do."""


class ConfigError(ValueError):
    """A config field out of its range, named with its value and what is allowed."""


# ---------------------------------------------------------------------------------------------------------------
# The agent: the world model (E, D, G) and the policy π with its value V


class Agent(torch.nn.Module):
    """Tokenizer (E, D), world model G and actor-critic (π, V), with `act`, `save` and `load` for research code."""

    def __init__(self, config: IRISConfig, num_actions: int, device: str | torch.device = "cpu"):
        super().__init__()
        validate_config(config)
        self.config, self.num_actions = config, num_actions
        self.tokenizer = Tokenizer(config.tokenizer)
        tokens = dict(vocab_size=config.tokenizer.vocab_size, tokens_per_frame=config.tokenizer.tokens_per_frame)
        self.world_model = WorldModel(config.world_model, num_actions=num_actions, **tokens)
        self.actor_critic = ActorCritic(config.actor_critic, num_actions, frame_size=config.env.frame_size)
        self.to(device)
        if config.channels_last:  # copies keep this layout: load_state_dict writes into these tensors
            self.tokenizer.to(memory_format=torch.channels_last)
            self.actor_critic.to(memory_format=torch.channels_last)
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None  # LSTM state (h, c) of the episodes being played

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def describe(self) -> str:
        """The device and each component's size, as train.py prints them: "device cpu | tokenizer 1.09M params | ..."."""
        sizes = {name: sum(p.numel() for p in getattr(self, name).parameters()) / 1e6 for name in COMPONENTS}
        return " | ".join([f"device {self.device}"] + [f"{name} {size:.2f}M params" for name, size in sizes.items()])

    def autocast(self) -> torch.autocast:
        """bf16 autocast for forward passes, where config.bf16 asks for it on this device; else a no-op."""
        enabled = self.config.bf16 == "always" or (self.config.bf16 == "cuda" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Adam for E, D and for π, V; AdamW with weight decay on G's Linear weights only (Table 4)."""
        cfg = self.config
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        fused = cfg.fused_adam and self.device.type in ("cuda", "cpu")  # where torch has the fused kernel
        adam = {"lr": cfg.learning_rate, "betas": betas, "fused": fused or None}
        return {
            "tokenizer": torch.optim.Adam(self.tokenizer.parameters(), **adam),
            "world_model": self.world_model.configure_optimizer(cfg.learning_rate, betas, fused),
            "actor_critic": torch.optim.Adam(self.actor_critic.parameters(), **adam),
        }

    @torch.no_grad()
    def act(self, obs: np.ndarray, first: np.ndarray, temperature: float = 1.0, epsilon: float = 0.0) -> np.ndarray:
        """Actions for n real environments. obs (n, h, w, 3) uint8 (64 x 64); first (n,) True where an episode starts."""
        frames = torch.as_tensor(obs, device=self.device).permute(0, 3, 1, 2)  # (n, 3, 64, 64)
        first_t = torch.as_tensor(first, device=self.device, dtype=torch.bool)
        if self.state is None or self.state[0].shape[0] != len(obs):
            self.state = self.actor_critic.initial_state(len(obs), self.device)
        self.state = self.actor_critic.reset_state(self.state, first_t)  # the LSTM state follows the episode
        with self.autocast():
            actions, self.state = self.actor_critic.act(frames, self.state, self.tokenizer, temperature, epsilon)
        return actions.cpu().numpy()

    @torch.no_grad()
    def burn_in(self, frames: torch.Tensor, mask: torch.Tensor) -> None:
        """Set the LSTM state from the real frames (n, T, 3, 64, 64) uint8 before the next act (Appendix A.3).

        mask (n, T) is False on left padding. As the reference collector, the policy sees them reconstructed.
        """
        frames, mask = frames.to(self.device), mask.to(self.device)
        if frames.shape[1] == 0:
            self.state = self.actor_critic.initial_state(frames.shape[0], self.device)
            return
        with self.autocast():
            self.state = self.actor_critic.burn_in(self.tokenizer.encode_decode(frames), mask)

    def play_test_episodes(
        self,
        num_episodes: int,
        seed: int,
        temperature: float | None = None,
        num_envs: int | None = None,
        progress: bool = True,
        on_step: StepHook | None = None,
    ) -> list[float]:
        """Returns of test episodes (Section 3.2: no end on life loss, ε = 0) in the agent's env config, in num_envs
        parallel envs (default eval_envs), sampling at temperature (default eval_temperature, Table 5), each from a
        fresh LSTM state. progress and on_step: env.run_episodes's."""
        temperature = self.config.eval_temperature if temperature is None else temperature
        self.eval()
        self.state = None

        def policy(obs: np.ndarray, first: np.ndarray) -> np.ndarray:
            return self.act(obs, first, temperature, epsilon=TEST_EPSILON)

        game, env, num_envs = self.config.game, self.config.env, num_envs or self.config.eval_envs
        returns = run_episodes(
            game, policy, num_episodes, num_envs, seed, train=False, config=env, progress=progress, on_step=on_step
        )
        self.state = None  # the next act starts afresh, not from a test episode's state
        return returns

    def save(self, path: str | Path, **extra: Any) -> None:
        """Atomically write the weights and the config they need (VGG is never saved: it is not ours to train)."""
        atomic_save(self.checkpoint_dict(**extra), path)

    def checkpoint_dict(self, **extra: Any) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "game": self.config.game,
            "num_actions": self.num_actions,
            "agent": {name: getattr(self, name).state_dict() for name in COMPONENTS},
            **extra,
        }

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> Agent:
        """Rebuild an agent from a checkpoint alone (its stored config), e.g. `Agent.load("runs/x/checkpoint.pt")`."""
        return cls.from_checkpoint(load_checkpoint(path), device)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], device: str | torch.device | None = None) -> Agent:
        """The agent of a checkpoint dict already read (by load_checkpoint), in eval mode."""
        agent = cls(config_from_dict(checkpoint["config"]), checkpoint["num_actions"], device or pick_device("auto"))
        try:
            for name in COMPONENTS:
                getattr(agent, name).load_state_dict(checkpoint["agent"][name])
        except (RuntimeError, KeyError) as error:
            raise CheckpointError(f"the checkpoint's weights do not match its config ({error})") from error
        return agent.eval()

    @classmethod
    def from_authors_checkpoint(
        cls, path: str | Path, game: str | None = None, device: str | torch.device | None = None
    ) -> Agent:
        """One of the authors' published `<Game>.pt` files (AUTHORS_CHECKPOINT_URL), at the paper config, in eval
        mode. The number of actions is read from the file; the game is `game`, or else the file's name."""
        num_actions, state_dicts = load_authors_checkpoint(path)
        agent = cls(IRISConfig(game=game or Path(path).stem), num_actions, device or pick_device("auto"))
        for name in COMPONENTS:
            getattr(agent, name).load_state_dict(state_dicts[name])
        return agent.eval()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: one reader (with a run directory's fallback to the epoch before), one validator


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate an iris checkpoint: a run directory holding checkpoint.pt, or the .pt file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: give a run directory holding {CHECKPOINT} "
            "(written by train.py every epoch) or the path of a .pt checkpoint"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise CheckpointError(
            f"{path} is corrupt or not a checkpoint ({error}); "
            "delete it and resume from an earlier copy, or start a new run"
        ) from error
    missing = [k for k in CHECKPOINT_KEYS if not (isinstance(checkpoint, dict) and k in checkpoint)]
    if missing:
        raise CheckpointError(
            f"{path} is not an iris checkpoint (it lacks {', '.join(missing)}); "
            "a checkpoint of the authors' code loads with --authors_checkpoint"
        )
    return checkpoint


def load_run_checkpoint(run_dir: Path) -> dict[str, Any]:
    """A run directory's CHECKPOINT, or PREVIOUS when CHECKPOINT is missing or unreadable (one line says so; the bad
    file is kept aside as CORRUPT, so that the next save does not make it the fallback)."""
    path, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS
    try:
        return load_checkpoint(path)
    except (CheckpointError, FileNotFoundError) as error:
        if not previous.is_file():
            raise
        reason = "missing" if isinstance(error, FileNotFoundError) else str(error.__cause__ or error).splitlines()[0]
    try:
        checkpoint = load_checkpoint(previous)
    except CheckpointError as error:
        raise CheckpointError(f"{path} ({reason}) and {previous} are both unreadable ({error.__cause__ or error})")
    kept = ""
    if path.is_file():
        os.replace(path, run_dir / CORRUPT)
        kept = f"; the bad file is kept as {CORRUPT}"
    print(
        f"{CHECKPOINT} is unreadable ({reason}): resuming from {PREVIOUS}, epoch {checkpoint['epoch']} "
        f"({checkpoint['env_steps']} env steps){kept}",
        flush=True,
    )
    return checkpoint


def check_checkpoint(
    checkpoint: dict[str, Any],
    source: Path,
    game: str | None = None,
    num_actions: int | None = None,
    run_config: dict[str, Any] | None = None,
) -> None:
    """Refuse a checkpoint trained on another game than asked, with another action set, or of another run."""
    trained_on = checkpoint["game"]
    if game is not None and game.lower() != trained_on.lower():
        raise CheckpointError(
            f"{source}: this checkpoint was trained on {trained_on}, not {game}; "
            f"pass a {game} checkpoint or drop --game"
        )
    if num_actions is not None and num_actions != checkpoint["num_actions"]:
        raise CheckpointError(
            f"{source}: the agent has {checkpoint['num_actions']} actions but {trained_on}'s "
            f"action set has {num_actions}; it was trained with another env config"
        )
    if run_config is not None:
        run_config = {k: v for k, v in run_config.items() if k not in RUN_SPECIFIC_KEYS}
        differing = differing_keys(run_config, checkpoint["config"])
        if differing:
            raise CheckpointError(
                f"{source}: its config differs from its run's config.json in "
                f"{', '.join(differing[:8])}; this checkpoint belongs to another run"
            )


def config_json_edits(path: Path, config: dict[str, Any]) -> str:
    """How a run's config.json differs from its checkpoint's config dict ('' when it does not): train.py's resume
    warns and rewrites it, where check_checkpoint refuses a checkpoint of another run."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"unreadable: {error}"
    if not isinstance(recorded, dict):
        return "not a JSON object"
    edits = differing_keys(recorded, config)
    return ", ".join(f"{key} {flat_value(recorded, key)!r} instead of {flat_value(config, key)!r}" for key in edits)


RUN_SPECIFIC_KEYS = ("device", "out")  # config.json fields that may differ from the checkpoint's (--device on resume)


def differing_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys present in both nested dicts whose values differ (a tuple equals the list JSON made of it)."""
    differing = []
    for key in a.keys() & b.keys():
        if isinstance(a[key], dict) and isinstance(b[key], dict):
            differing += differing_keys(a[key], b[key], f"{prefix}{key}.")
        elif a[key] != b[key] and not (isinstance(a[key], list | tuple) and list(a[key]) == list(b[key])):
            differing.append(prefix + key)
    return sorted(differing)


# ---------------------------------------------------------------------------------------------------------------
# Process: device (and a warning when a CPU would train for days), seeds, memory, stop signals


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name} was asked for but this torch build sees no CUDA device; use --device cpu or --device auto"
        )
    return torch.device(name)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def setup_process(config: IRISConfig, device: torch.device) -> None:
    """Process-wide settings an entry point's main() applies once, before building an agent."""
    if device.type == "cpu" and config.reuse_freed_memory:
        reuse_freed_memory()


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


STOP: dict[str, Any] = {"signal": None, "deferred": False, "pid": None}  # SIGINT/SIGTERM received, a save under way


def catch_stop_signals() -> None:
    """SIGINT and SIGTERM stop this process (KeyboardInterrupt), or right after the `deferred_signals` block under
    way, so that an entry point's save is never cut in half."""
    STOP["pid"] = os.getpid()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)


def on_signal(signum: int, frame: Any) -> None:
    """SIGINT or SIGTERM: stop now, or right after the save under way; a second signal exits at once."""
    if STOP["signal"] is not None or os.getpid() != STOP["pid"]:  # or in a forked env worker: it just ends
        os._exit(128 + signum)
    STOP["signal"] = signum
    if not STOP["deferred"]:
        raise KeyboardInterrupt  # the entry point's main() turns it into one line


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """A SIGINT or SIGTERM received in the block stops the run when the block is done."""
    STOP["deferred"] = True
    try:
        yield
    finally:
        STOP["deferred"] = False
    if STOP["signal"] is not None:
        raise KeyboardInterrupt


# Seconds of one training step of each component at the paper config (batches 256, 64, 64) on a 2-core Xeon CPU,
# `python bench.py --repeats 1 --warmup 0` (README, Speed): a rough yardstick, not a measurement of this machine.
CPU_SECONDS_PER_STEP = {"tokenizer": 70.0, "world_model": 25.0, "actor_critic": 174.0}
CPU_WARNING_DAYS = 1.0  # warn when the training steps of a CPU run are projected to take longer than this


def cpu_time_warning(config: IRISConfig, device: torch.device, done_epochs: int = 0) -> str | None:
    """A warning when the epochs left would train paper-size components on a CPU for more than CPU_WARNING_DAYS,
    projected from CPU_SECONDS_PER_STEP and this config's steps and batch sizes; None otherwise."""
    if device.type != "cpu":
        return None
    paper, seconds = IRISConfig(), 0.0
    for name, step_seconds in CPU_SECONDS_PER_STEP.items():
        if getattr(config, name) == getattr(paper, name):  # another size has no measurement: a lower bound
            epochs = config.epochs - max(getattr(config, f"start_{name}_after_epochs"), done_epochs)
            batch = getattr(config, f"{name}_batch_size") / getattr(paper, f"{name}_batch_size")
            seconds += max(0, epochs) * config.training_steps_per_epoch * batch * step_seconds
    days = seconds / 86_400
    if days <= CPU_WARNING_DAYS:
        return None
    return (
        f"warning: this config on a CPU: about {days:,.0f} days of training steps (a step of each paper-size "
        f"component took {', '.join(f'{s:.0f}' for s in CPU_SECONDS_PER_STEP.values())} s on a 2-core Xeon, "
        "README Speed); the paper reports 3.5 days per game on an A100. Going on; --preset tiny or small fit a CPU"
    )


# ---------------------------------------------------------------------------------------------------------------
# Config fields as flags: --epochs 10, --tokenizer.vocab_size 64, --preset tiny


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


def flat_fields(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"tokenizer.vocab_size": value, ...} for every leaf field of a (nested) config dataclass."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_fields(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
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


def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field of a config dataclass, read from its source: {"gamma": "γ, Table 6"}."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    body = ast.parse(source).body[0].body  # the class's statements
    return {
        node.target.id: comments[node.end_lineno]
        for node in body
        if isinstance(node, ast.AnnAssign) and node.end_lineno in comments
    }


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--preset and one flag per IRISConfig field, nested ones as --tokenizer.vocab_size; absent flags stay unset.
    Each flag's help is its field's comment (the paper's name and table) and its default; a group per component."""
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="paper", help="paper (Tables 2-6), small or tiny (README)"
    )
    top = field_comments(IRISConfig)
    sections = {"": (IRISConfig, "IRISConfig: training loop (Table 5), evaluation, speed")}
    for f in fields(IRISConfig):
        if dataclasses.is_dataclass(f.default_factory):
            sections[f.name] = f.default_factory, f"{f.default_factory.__name__}: {top[f.name]}"
    groups = {name: parser.add_argument_group(title) for name, (_, title) in sections.items()}
    comments = {name: field_comments(cls) for name, (cls, _) in sections.items()}
    for name, default in flat_fields(IRISConfig()).items():
        section, _, leaf = name.rpartition(".")
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        shown = '""' if shown == "" else shown

        def convert(text: str, default: Any = default) -> Any:
            try:
                return parse_value(text, default)
            except ValueError as error:
                raise argparse.ArgumentTypeError(f"expected a {type(default).__name__}: {error}") from error

        groups[section].add_argument(
            f"--{name}",
            type=convert,
            default=argparse.SUPPRESS,
            metavar=type(default).__name__,
            help=f"{comments[section].get(leaf, '')} (default {shown})".strip().replace("%", "%%"),
        )


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line, {"tokenizer.vocab_size": 64, ...}."""
    names = flat_fields(IRISConfig())
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: argparse.Namespace) -> IRISConfig:
    """IRISConfig of the preset, then the flags given."""
    config = IRISConfig()
    for name, value in PRESETS[args.preset].items():
        set_field(config, name, value)
    apply_overrides(config, config_overrides(args))
    return config


def config_from_checkpoint(checkpoint: dict[str, Any], overrides: dict[str, Any]) -> IRISConfig:
    """The config a run's checkpoint stores, then the flags given on resume (train.py: --epochs N, a longer run),
    validated: a run cannot be cut below the epochs it has done."""
    config = config_from_dict(checkpoint["config"])
    apply_overrides(config, overrides)
    validate_config(config)
    if config.epochs < checkpoint["epoch"]:
        raise ConfigError(f"the run has done {checkpoint['epoch']} epochs: --epochs {config.epochs} cannot undo them")
    return config


def apply_overrides(config: IRISConfig, overrides: dict[str, Any]) -> None:
    """Set the fields given; --epochs alone shortens the collection with it (--preset tiny --epochs 4 collects in
    all 4 epochs), so that only an explicit collection_epochs > epochs is refused by validate_config."""
    for name, value in overrides.items():
        set_field(config, name, value)
    if "epochs" in overrides and "collection_epochs" not in overrides:
        config.collection_epochs = min(config.collection_epochs, config.epochs)


class CLIParser(argparse.ArgumentParser):
    """argparse for every entry point: an error is one line, `train.py: error: ... (see --help)`, not a usage
    message of every config flag first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------------------------------
# Media: one video writer for train.py's GIFs, evaluate.py's best episode and play.py's recordings


FIGURE4_REWARD, FIGURE4_END = (255, 215, 0), (220, 0, 0)  # Figure 4's boxes: a predicted reward, a predicted end


def figure4_video(frames: torch.Tensor, rewards: torch.Tensor, ends: torch.Tensor, border: int) -> np.ndarray:
    """Imagined trajectories side by side, as Figure 4: frames (n, H + 1, 3, h, w) uint8, rewards and ends (n, H)
    predicted on the step into frames 1..H, framed in yellow where a reward is, red where an end is (else black).
    Returns a video (H + 1, h + 2 border, n (w + 2 border), 3) uint8."""
    n, steps, _, h, w = frames.shape
    colour = torch.zeros(n, steps, 3, dtype=torch.uint8, device=frames.device)
    colour[:, 1:][rewards > 0] = colour.new_tensor(FIGURE4_REWARD)
    colour[:, 1:][ends > 0] = colour.new_tensor(FIGURE4_END)
    padded = colour[..., None, None].expand(-1, -1, -1, h + 2 * border, w + 2 * border).clone()
    padded[..., border : border + h, border : border + w] = frames
    return padded.permute(1, 3, 0, 4, 2).reshape(steps, h + 2 * border, n * (w + 2 * border), 3).cpu().numpy()


def write_video(video: np.ndarray, path: Path, fps: float) -> Path:
    """Frames (T, H, W, 3) uint8 RGB as an MP4 (OpenCV) or a GIF (Pillow), chosen by the file's extension."""
    path = Path(path)
    if path.suffix.lower() == ".mp4":
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, video.shape[2:0:-1])
        if not writer.isOpened():
            raise OSError(f"OpenCV cannot write an MP4 at {path}; write a .gif instead")
        for image in video:
            writer.write(np.ascontiguousarray(image[..., ::-1]))  # OpenCV wants BGR
        writer.release()
    elif path.suffix.lower() == ".gif":
        images = [Image.fromarray(image) for image in video]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    else:
        raise ValueError(f"{path}: a video is written as .mp4 or .gif, not {path.suffix or 'a file with no extension'}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# The authors' published agents (eloialonso/iris, README "Pretrained models"): one `<Game>.pt` per game of Table 1,
# their Agent's state_dict at the paper config. Their modules hold the same numbers as ours under other names:
# taming-transformers names for E and D, minGPT names for G, conv1..conv4 for π and V; separate q, k, v layers
# where ours fuse them into one `qkv` (concatenated along dim 0 in that order). They also save tensors ours do not
# keep, checked here and dropped: the frozen LPIPS net (`tokenizer.lpips.*`), the causal masks of attention, and
# the heads' index buffers.

# The first author's Hugging Face repository, linked from the README of eloialonso/iris since August 2024. Before
# that it linked the git-lfs repository github.com/eloialonso/iris_pretrained_models, whose pointers list the 26
# files pretrained_models/<Game>.pt, about 126.5 MB each (Pong.pt: 126,508,385 bytes).
AUTHORS_CHECKPOINT_URL = "https://huggingface.co/eloialonso/iris/resolve/main/pretrained_models/{game}.pt"
ACTOR_HEAD = "actor_critic.actor_linear.weight"  # (A, 512): where the number of actions is read

Pairs = list[tuple[str, tuple[str, ...]]]  # (our module, their module or their q, k, v modules fused in ours)


def load_authors_checkpoint(path: str | os.PathLike) -> tuple[int, dict[str, dict[str, torch.Tensor]]]:
    """Read one of the authors' `<Game>.pt` files (on the CPU) and convert it: (A, our three state_dicts)."""
    state_dict = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs on load
    return convert_authors_state_dict(state_dict)


def convert_authors_state_dict(state_dict: Mapping) -> tuple[int, dict[str, dict[str, torch.Tensor]]]:
    """The authors' Agent state_dict -> (A, {"tokenizer": sd, "world_model": sd, "actor_critic": sd}) for Tokenizer,
    WorldModel and ActorCritic at the paper config. Anything else is refused with a ValueError that says why."""
    check_is_state_dict(state_dict)
    head = state_dict.get(ACTOR_HEAD)
    if head is None or head.dim() != 2:
        refuse(f"no actor head {ACTOR_HEAD} of shape (A, 512) to read the number of actions A from")
    num_actions = head.shape[0]
    pairs = parameter_pairs(num_actions)
    expected = {key: shape for theirs_keys in pairs.values() for key, shape in theirs_keys}
    expected.update(extra_shapes(num_actions))
    check_names_and_shapes(state_dict, expected, num_actions)
    check_extra_values(state_dict, num_actions)

    converted: dict[str, dict[str, torch.Tensor]] = {name: {} for name in COMPONENTS}
    for ours, theirs_keys in pairs.items():
        component, key = ours.split(".", 1)
        tensors = [state_dict[theirs] for theirs, _ in theirs_keys]
        converted[component][key] = tensors[0] if len(tensors) == 1 else torch.cat(tensors)  # q, k, v stacked
    return num_actions, converted


def authors_state_dict(state_dicts: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Our three state_dicts (paper config) -> a state_dict in the authors' layout, every name and shape theirs.

    Their extra tensors are filled in: the causal masks and head indices as their code builds them, LPIPS's
    ScalingLayer constants, and zeros for the LPIPS weights (VGG16, lin0..lin4), which our state_dicts lack.
    """
    num_actions = state_dicts["actor_critic"]["actor_head.weight"].shape[0]
    written: dict[str, torch.Tensor] = {}
    for ours, theirs_keys in parameter_pairs(num_actions).items():
        component, key = ours.split(".", 1)
        tensor = state_dicts[component][key]
        for theirs, part in zip((k for k, _ in theirs_keys), tensor.chunk(len(theirs_keys))):  # q, k, v split
            written[theirs] = part.clone()
    for key, shape in extra_shapes(num_actions).items():
        written[key] = torch.zeros(shape)
    written.update({key: value.clone() for key, value in extra_values(num_actions).items()})  # no shared storage
    return written


# ----------------------------------------------------------------------------------------------------------------------
# The layout: our parameter names next to theirs


def paper_modules(num_actions: int) -> dict[str, nn.Module]:
    """Our three modules at the paper config, on the meta device (names and shapes only, no memory, no init cost)."""
    tokenizer_config = TokenizerConfig()
    with torch.device("meta"):
        return {
            "tokenizer": Tokenizer(tokenizer_config),
            "world_model": WorldModel(
                WorldModelConfig(), tokenizer_config.vocab_size, tokenizer_config.tokens_per_frame, num_actions
            ),
            "actor_critic": ActorCritic(ActorCriticConfig(), num_actions, EnvConfig().frame_size),
        }


def parameter_pairs(num_actions: int) -> dict[str, list[tuple[str, torch.Size]]]:
    """Our full key (e.g. "tokenizer.encoder.0.weight") -> [(their key, their shape), ...].

    One key of theirs per key of ours, except the fused attention projections: three keys (q, k, v, in the order
    in which ours splits its qkv output), each a third of ours along dim 0.
    """
    pairs = {}
    modules = paper_modules(num_actions)
    module_pairs = {"tokenizer": tokenizer_pairs, "world_model": world_model_pairs, "actor_critic": actor_critic_pairs}
    for component, module in modules.items():
        for ours, theirs in module_pairs[component](module):
            for name, tensor in module.get_submodule(ours).state_dict().items():  # weight, bias, weight_ih, ...
                their_shape = torch.Size((tensor.shape[0] // len(theirs), *tensor.shape[1:]))
                their_keys = [(f"{component}.{module_name}.{name}", their_shape) for module_name in theirs]
                pairs[f"{component}.{ours}.{name}"] = their_keys
        ours_keys = {f"{component}.{key}" for key in module.state_dict()}
        mapped = {key for key in pairs if key.startswith(f"{component}.")}
        assert mapped == ours_keys, f"unmapped {component} keys: {sorted(ours_keys ^ mapped)[:5]}"
    return pairs


def tokenizer_pairs(tokenizer: Tokenizer) -> Pairs:
    """taming-transformers names (the authors' src/models/tokenizer/nets.py) for our nn.Sequential E and D."""
    pairs: Pairs = [(name, (name,)) for name in ("pre_quant_conv", "embedding", "post_quant_conv")]
    config = tokenizer.config
    for part, names in (("encoder", encoder_names(config)), ("decoder", decoder_names(config))):
        layers = getattr(tokenizer, part)
        assert len(layers) == len(names), (part, len(layers), len(names))
        for index, (layer, name) in enumerate(zip(layers, names)):
            for ours, theirs in layer_pairs(layer):
                pairs.append((f"{part}.{index}{ours}", tuple(f"{part}.{name}{t}" for t in theirs)))
    return pairs


def encoder_names(config: TokenizerConfig) -> list[str]:
    """Their name for each layer of build_encoder's nn.Sequential, in order ("" for the parameter-free SiLU)."""
    names, resolution = ["conv_in"], config.resolution
    for level in range(len(config.ch_mult)):
        for block in range(config.num_res_blocks):
            names.append(f"down.{level}.block.{block}")
            if resolution in config.attn_resolutions:
                names.append(f"down.{level}.attn.{block}")
        if level != len(config.ch_mult) - 1:
            names.append(f"down.{level}.downsample")
            resolution //= 2
    return names + ["mid.block_1", "mid.attn_1", "mid.block_2", "norm_out", "", "conv_out"]


def decoder_names(config: TokenizerConfig) -> list[str]:
    """Their name for each layer of build_decoder's nn.Sequential; their `up` list is indexed by level, 0 = 64x64."""
    names, resolution = ["conv_in", "mid.block_1", "mid.attn_1", "mid.block_2"], config.latent_resolution
    for level in reversed(range(len(config.ch_mult))):
        for block in range(config.num_res_blocks + 1):
            names.append(f"up.{level}.block.{block}")
            if resolution in config.attn_resolutions:
                names.append(f"up.{level}.attn.{block}")
        if level != 0:
            names.append(f"up.{level}.upsample")
            resolution *= 2
    return names + ["norm_out", "", "conv_out"]


def layer_pairs(layer: nn.Module) -> Pairs:
    """(our submodule suffix, their submodule suffixes) within one layer of E or D."""
    if isinstance(layer, ResidualBlock):  # body: norm1, SiLU, conv1, norm2, SiLU, dropout, conv2
        pairs = [(".body.0", (".norm1",)), (".body.2", (".conv1",)), (".body.3", (".norm2",)), (".body.6", (".conv2",))]
        return pairs + [(".skip", (".nin_shortcut",))] if isinstance(layer.skip, nn.Conv2d) else pairs
    if isinstance(layer, SelfAttention):
        return [(".norm", (".norm",)), (".qkv", (".q", ".k", ".v")), (".proj", (".proj_out",))]
    if isinstance(layer, (Downsample, Upsample)):
        return [(".conv", (".conv",))]
    if isinstance(layer, (nn.Conv2d, nn.GroupNorm)):
        return [("", ("",))]
    assert not list(layer.parameters()), f"no authors' name for {layer}"
    return []


def world_model_pairs(world_model: WorldModel) -> Pairs:
    """minGPT names (the authors' src/models/world_model.py and transformer.py)."""
    pairs: Pairs = [
        ("action_embedding", ("embedder.embedding_tables.0",)),
        ("frame_embedding", ("embedder.embedding_tables.1",)),
        ("position_embedding", ("pos_emb",)),
        ("ln_f", ("transformer.ln_f",)),
    ]
    for i in range(len(world_model.blocks)):
        ours, theirs = f"blocks.{i}", f"transformer.blocks.{i}"
        pairs += [(f"{ours}.{name}", (f"{theirs}.{name}",)) for name in ("ln1", "ln2", "attn.proj", "mlp.0", "mlp.2")]
        pairs.append((f"{ours}.attn.qkv", tuple(f"{theirs}.attn.{name}" for name in ("query", "key", "value"))))
    for head in ("head_observations", "head_rewards", "head_ends"):
        pairs += [(f"{head}.{layer}", (f"{head}.head_module.{layer}",)) for layer in (0, 2)]
    return pairs


def actor_critic_pairs(actor_critic: ActorCritic) -> Pairs:
    """The authors' src/models/actor_critic.py: conv1..conv4 where ours has encoder.{0, 3, 6, 9}."""
    convs = [name for name, module in actor_critic.encoder.named_children() if isinstance(module, nn.Conv2d)]
    pairs: Pairs = [(f"encoder.{name}", (f"conv{i + 1}",)) for i, name in enumerate(convs)]
    return pairs + [("lstm", ("lstm",)), ("actor_head", ("actor_linear",)), ("critic_head", ("critic_linear",))]


# ----------------------------------------------------------------------------------------------------------------------
# Their tensors that ours do not keep: checked, then dropped


def extra_shapes(num_actions: int) -> dict[str, torch.Size]:
    """Shapes of the authors' tensors that have no counterpart here: LPIPS, attention masks, head indices."""
    import torchvision  # here, as in tokenizer.PerceptualLoss: not on every script's start-up

    shapes = {f"tokenizer.lpips.scaling_layer.{name}": torch.Size((1, 3, 1, 1)) for name in ("shift", "scale")}
    with torch.device("meta"):
        vgg = torchvision.models.vgg16().features[: VGG16_STAGE_ENDS[-1] + 1]
    for name, tensor in vgg.state_dict().items():  # "{i}.weight" -> their net.slice{s}.{i}.weight
        stage = next(s for s, end in enumerate(VGG16_STAGE_ENDS) if int(name.split(".")[0]) <= end)
        shapes[f"tokenizer.lpips.net.slice{stage + 1}.{name}"] = tensor.shape
    for i, channels in enumerate(LPIPS_CHANNELS):
        shapes[f"tokenizer.lpips.lin{i}.model.1.weight"] = torch.Size((1, channels, 1, 1))  # model.0 is dropout
    shapes.update({key: value.shape for key, value in extra_values(num_actions).items() if "lpips" not in key})
    return shapes


def extra_values(num_actions: int) -> dict[str, torch.Tensor]:
    """The values the authors' code gives its buffers at the paper config (none depends on training)."""
    config, K = WorldModelConfig(), TokenizerConfig().tokens_per_frame
    max_tokens = config.max_timesteps * (K + 1)  # L(K+1) = 340
    values = {
        f"tokenizer.lpips.scaling_layer.{name}": torch.tensor(numbers).view(1, 3, 1, 1)
        for name, numbers in (("shift", LPIPS_SHIFT), ("scale", LPIPS_SCALE))
    }
    mask = torch.ones(max_tokens, max_tokens).tril()  # causal: position p attends to 0..p
    values.update({f"world_model.transformer.blocks.{i}.attn.mask": mask for i in range(config.num_layers)})
    position = torch.arange(max_tokens) % (K + 1)  # position within each block of K frame tokens + 1 action token
    positions = torch.arange(max_tokens)
    values["world_model.head_observations.indices"] = positions[position != K - 1]  # all but the last frame token
    values["world_model.head_rewards.indices"] = positions[position == K]  # the action tokens
    values["world_model.head_ends.indices"] = positions[position == K]
    return values


# ----------------------------------------------------------------------------------------------------------------------
# Checks


def refuse(reason: str) -> NoReturn:
    raise ValueError(
        f"Not one of the authors' IRIS checkpoints: {reason}. Expected the state_dict of their Agent "
        f"(eloialonso/iris, one <Game>.pt per game, {AUTHORS_CHECKPOINT_URL.format(game='<Game>')}) at the paper "
        f"config: tensors under {', '.join(c + '.' for c in COMPONENTS)} with their names and shapes, e.g. "
        f"{ACTOR_HEAD} of shape (A, 512)."
    )


def check_is_state_dict(state_dict: object) -> None:
    if not isinstance(state_dict, Mapping):
        refuse(f"the file holds a {type(state_dict).__name__}, not a state_dict")
    if {"agent", "config", "num_actions"} <= set(state_dict):
        refuse(
            "this is a checkpoint of this project (keys 'agent', 'config', 'num_actions'); load it with "
            "Agent.load(path) instead"
        )
    if "world_model.frame_embedding.weight" in state_dict or "tokenizer.encoder.0.weight" in state_dict:
        refuse(
            "this is the state_dict of this project's Agent (our names, e.g. world_model.frame_embedding); "
            "load it with load_state_dict instead"
        )
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        refuse(f"{len(not_tensors)} entries are not tensors, e.g. {not_tensors[:3]}")


def check_names_and_shapes(state_dict: Mapping, expected: dict[str, torch.Size], num_actions: int) -> None:
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        refuse(
            f"{len(missing)} missing tensors {missing[:5]} and {len(unexpected)} unexpected ones "
            f"{unexpected[:5]} (with A = {num_actions} actions read from {ACTOR_HEAD})"
        )
    wrong = [
        f"{key} {tuple(state_dict[key].shape)} instead of {tuple(shape)}"
        for key, shape in expected.items()
        if state_dict[key].shape != shape
    ]
    if wrong:
        refuse(
            f"{len(wrong)} tensors have other shapes (with A = {num_actions} actions read from {ACTOR_HEAD}): "
            f"{'; '.join(wrong[:5])}"
        )


def check_extra_values(state_dict: Mapping, num_actions: int) -> None:
    for key, value in extra_values(num_actions).items():
        if "lpips" not in key and not torch.equal(state_dict[key].to(value.dtype), value):
            refuse(f"{key} is not the paper config's (causal attention over L(K+1) = 340 tokens, K = 16)")


# ---------------------------------------------------------------------------------------------------------------
# Validation: the range of every field, in one place, checked before a run touches the disk


def _is_device(name: str) -> bool:
    try:
        return name == "auto" or torch.device(name).type in ("cpu", "cuda", "mps")
    except RuntimeError:
        return False


AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
POSITIVE = (lambda v: 0 < v < float("inf"), "> 0")
PROBABILITY = (lambda v: 0 <= v <= 1, "0 to 1")
BELOW_1 = (lambda v: 0 <= v < 1, "0 <= value < 1")
SIZES = (lambda v: all(n >= 1 for n in v), "integers >= 1")
# Fields absent here (game, out and the booleans) are only type-checked; game is checked by env.canonical_game.
# fmt: off
CONFIG_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: 0 <= v < 2**32, "0 to 2**32 - 1"), "device": (_is_device, "auto, cpu, cuda, cuda:N or mps"),
    **dict.fromkeys(["epochs", "collection_epochs", "env_steps_per_epoch", "training_steps_per_epoch",
                     "tokenizer_batch_size", "world_model_batch_size", "actor_critic_batch_size", "eval_every",
                     "eval_episodes", "final_eval_episodes", "eval_envs", "media_trajectories", "encode_batch_size",
                     "tokenizer.resolution", "tokenizer.ch", "tokenizer.num_res_blocks", "tokenizer.z_channels",
                     "tokenizer.vocab_size", "tokenizer.embed_dim", "tokenizer.num_groups",
                     "world_model.max_timesteps", "world_model.embed_dim", "world_model.num_layers",
                     "world_model.num_heads", "actor_critic.lstm_dim", "actor_critic.imagination_horizon",
                     "env.frame_skip", "env.max_train_frames", "env.max_test_frames"], AT_LEAST_1),
    **dict.fromkeys(["start_tokenizer_after_epochs", "start_world_model_after_epochs",
                     "start_actor_critic_after_epochs", "tokenizer.perceptual_weight", "world_model.weight_decay",
                     "actor_critic.burn_in", "actor_critic.entropy_weight", "env.noop_max", "env.test_noop_max"],
                    AT_LEAST_0),
    **dict.fromkeys(["collect_temperature", "eval_temperature"], AT_LEAST_0),  # 0: argmax (ActorCritic.act)
    **dict.fromkeys(["learning_rate", "max_grad_norm"], POSITIVE),
    **dict.fromkeys(["collect_epsilon", "actor_critic.lam", "env.repeat_action_probability"], PROBABILITY),
    **dict.fromkeys(["adam_beta1", "adam_beta2", "tokenizer.dropout", "world_model.embed_dropout",
                     "world_model.attn_dropout", "world_model.resid_dropout", "tokenizer.perceptual_dropout"], BELOW_1),
    "bf16": (lambda v: v in BF16_MODES, " or ".join(BF16_MODES)),
    "tokenizer.in_channels": (lambda v: v == 3, "3 (RGB frames)"),
    "tokenizer.ch_mult": (lambda v: len(v) >= 1 and SIZES[0](v), "one or more integers >= 1"),
    "tokenizer.attn_resolutions": SIZES,
    "world_model.reward_loss": (lambda v: v in ("ce", "mse"), "ce or mse"),
    "tokenizer.reconstruction_loss": (lambda v: v in RECONSTRUCTION_LOSSES, " or ".join(RECONSTRUCTION_LOSSES)),
    "actor_critic.conv_channels": (lambda v: 1 <= len(v) <= 6 and SIZES[0](v), "1 to 6 integers >= 1"),
    "actor_critic.gamma": (lambda v: 0 < v <= 1, "0 < γ <= 1"),
    "actor_critic.bootstrap": (lambda v: v in BOOTSTRAPS, " or ".join(BOOTSTRAPS)),
    "env.frame_size": (lambda v: v >= 4, ">= 4 (64 in Table 2; a small test game may use fewer pixels)"),
}
# fmt: on


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, int | float)
    if isinstance(default, tuple):
        return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, type(default))


def validate_config(config: IRISConfig) -> None:
    """Raise ConfigError naming every field out of range (its value and what is allowed), then the cross-field
    constraints. Called when an Agent is built and by train.py before a run directory is created."""
    problems = []
    for name, default in flat_fields(IRISConfig()).items():
        value = flat_value(config, name)
        if not _type_ok(value, default):
            problems.append(f"{name} = {value!r} is not a {type(default).__name__}")
        elif name in CONFIG_RANGES and not CONFIG_RANGES[name][0](value):
            problems.append(f"{name} = {value!r}, allowed: {CONFIG_RANGES[name][1]}")
    if not problems:
        problems = cross_field_problems(config)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def cross_field_problems(config: IRISConfig) -> list[str]:
    tok, wm = config.tokenizer, config.world_model
    levels = 2 ** (len(tok.ch_mult) - 1)  # E halves the resolution between levels
    checks = [
        (
            config.collection_epochs <= config.epochs,
            f"collection_epochs = {config.collection_epochs} is more than epochs = {config.epochs}: the first "
            "collection_epochs epochs collect (Table 5); lower collection_epochs or raise epochs",
        ),
        (
            tok.resolution == config.env.frame_size,
            f"tokenizer.resolution = {tok.resolution} differs from env.frame_size = {config.env.frame_size}",
        ),
        (
            tok.resolution % levels == 0,
            f"tokenizer.ch_mult = {tok.ch_mult!r} halves the frame {len(tok.ch_mult) - 1} "
            f"times: tokenizer.resolution = {tok.resolution} is not divisible by {levels}",
        ),
        (
            config.env.frame_size % 2 ** len(config.actor_critic.conv_channels) == 0,
            f"actor_critic.conv_channels = {config.actor_critic.conv_channels!r} halves the frame "
            f"{len(config.actor_critic.conv_channels)} times: env.frame_size = {config.env.frame_size} is not "
            f"divisible by {2 ** len(config.actor_critic.conv_channels)}",
        ),
        (
            wm.embed_dim % wm.num_heads == 0,
            f"world_model.embed_dim = {wm.embed_dim} is not divisible by world_model.num_heads = {wm.num_heads}",
        ),
    ]
    for channels in sorted({tok.ch * mult for mult in tok.ch_mult}):
        checks.append(
            (
                channels % min(tok.num_groups, channels) == 0,
                f"tokenizer.num_groups = {tok.num_groups} does not divide the {channels} channels of "
                "tokenizer.ch x tokenizer.ch_mult (GroupNorm)",
            )
        )
    return [message for ok, message in checks if not ok]


def flat_value(config: Any, name: str) -> Any:
    """The field "tokenizer.vocab_size" of a config dataclass, or of its `asdict` (a config.json)."""
    for part in name.split("."):
        config = config[part] if isinstance(config, Mapping) else getattr(config, part)
    return config
