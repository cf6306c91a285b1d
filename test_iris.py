"""Tests of iris against the paper, one section per file: `pytest test_iris.py` (or `-k tokenizer`, `-k env or replay`).

Real Atari games from ale-py, real files on disk, one tiny config on the CPU (tiny_config: the tiny preset with
TEST_SETTINGS); nothing is downloaded and nothing we own is mocked. GPU-only tests are skipped without CUDA.
"""

import collections
import contextlib
import csv
import fcntl
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import gymnasium as gym
import numpy as np
import PIL.Image
import PIL.ImageSequence
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate
import agent as agent_lib
import play
import sweep
import tokenizer as tokenizer_module
import train
from actor_critic import (
    ActorCritic,
    ActorCriticConfig,
    ImagineOutput,
    actor_critic_loss,
    compute_lambda_returns,
    imagine,
)
from agent import authors_state_dict, convert_authors_state_dict, load_authors_checkpoint
from env import ATARI_100K_GAMES, EnvConfig, action_names, canonical_game, make_env, run_episodes
from replay import ReplayBuffer
from tokenizer import RECONSTRUCTION_LOSSES, PerceptualLoss, Tokenizer, TokenizerConfig, commitment_losses
from world_model import WorldModel, WorldModelConfig, WorldModelEnv, interleave, sample

# ---------------------------------------------------------------------------------------------------------------------
# Shared by every section: one tiny config, one source of real frames, one way to run a script
# ---------------------------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent

# The tests' config: the tiny preset on Pong and the CPU, with 50 env steps and 8 training steps per epoch, 16 frames
# per tokenizer batch, and evaluations of one test episode capped at 100 agent steps (400 frames), never whole games.
TEST_SETTINGS = {
    "game": "Pong",
    "device": "cpu",
    "env_steps_per_epoch": 50,
    "training_steps_per_epoch": 8,
    "tokenizer_batch_size": 16,
    "eval_episodes": 1,
    "final_eval_episodes": 1,
    "eval_envs": 1,
    "env.max_test_frames": 400,
}
TINY_FLAGS = ["--preset", "tiny", *(text for name, v in TEST_SETTINGS.items() for text in (f"--{name}", str(v)))]


def tiny_config(settings: dict | None = None) -> agent_lib.IRISConfig:
    """The tiny preset with TEST_SETTINGS, then `settings` ({"env.max_test_frames": 40, ...}): a fresh copy."""
    config = agent_lib.IRISConfig()
    for name, value in {**agent_lib.PRESETS["tiny"], **TEST_SETTINGS, **(settings or {})}.items():
        agent_lib.set_field(config, name, value)
    return config


TINY = tiny_config()  # read only: TINY.tokenizer, TINY.world_model, TINY.actor_critic for tests of one component


def tiny_tokenizer(**changes) -> Tokenizer:
    return Tokenizer(replace(TINY.tokenizer, **changes))


def tiny_world_model(
    tokens_per_frame: int = TINY.tokenizer.tokens_per_frame,
    vocab_size: int = TINY.tokenizer.vocab_size,
    num_actions: int = 6,
    **changes,
) -> WorldModel:
    return WorldModel(replace(TINY.world_model, **changes), vocab_size, tokens_per_frame, num_actions)


def random_frames(*leading: int, seed: int = 0) -> torch.Tensor:
    """Uniform noise frames, (*leading, 3, 64, 64) uint8."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*leading, 3, 64, 64), dtype=torch.uint8, generator=generator)


@dataclass
class Play:
    """Steps of real play: x_t, a_t, r_t, d_t (ends on game over: Pong has no lives)."""

    frames: torch.Tensor  # (T, 3, 64, 64) uint8
    actions: torch.Tensor  # (T,) int64
    rewards: torch.Tensor  # (T,) float32
    ends: torch.Tensor  # (T,) int64


@pytest.fixture(scope="session")
def pong() -> Play:
    """The real frames of every test that needs some: 256 steps of uniformly random play in Pong's training env."""
    env = make_env("Pong", train=True, seed=0)
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    frames, actions, rewards, ends = [], [], [], []
    for _ in range(256):
        action = int(rng.integers(env.action_space.n))
        frames.append(obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        actions.append(action), rewards.append(reward), ends.append(int(terminated))
        assert not (terminated or truncated)  # one episode
    env.close()
    return Play(
        torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous(),
        torch.tensor(actions),
        torch.tensor(rewards, dtype=torch.float32),
        torch.tensor(ends),
    )


def pong_replay(pong: Play, steps: int = 48, episode: int = 20) -> ReplayBuffer:
    """The first `steps` of the recording in a dataset D, cut into episodes of `episode` steps (truncated)."""
    replay = ReplayBuffer(chunk_size=32)
    for t in range(steps):
        truncated = t % episode == episode - 1
        replay.add(
            pong.frames[t].permute(1, 2, 0).numpy(), int(pong.actions[t]), float(pong.rewards[t]), False, truncated
        )
    return replay


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread for the whole session: tiny models gain nothing from intra-op threads, and on a shared, loaded
    CPU the OpenMP threads of two-thread matmuls spin against each other (README, Speed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_script(script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """`python train.py ARGS` (or evaluate.py, ...) in a fresh process with one torch thread, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / script), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600, **kwargs)


def start_script(script: str, *args: str, **kwargs) -> subprocess.Popen:
    """The same, left running: for the tests that signal, kill or race it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=REPO, env=env, **kwargs)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that `build` fills once per session, even with pytest-xdist: the first worker to ask builds it under
    a lock while another waits for it, then all read it. For the fixtures that train a run (tens of seconds each)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base  # this session's folder, shared by workers
    folder, built = root / name, root / f"{name}.built"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        if not built.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a build that failed left
            folder.mkdir()
            build(folder)
            built.touch()
    return folder


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll until condition() holds, failing if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the test could act"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def run_main(main: Callable[[list[str]], None], *args: str) -> str | None:
    """A script's main(args) in this process, which saves an interpreter's start-up: None if it returned, else its
    exit message (sys.exit("error: ...")). The signal handlers train.main installs are put back afterwards."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        main(list(args))
    except SystemExit as exit_info:
        return str(exit_info.code)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return None


def video_shapes(path: Path) -> list[tuple[int, ...]]:
    """The shape (H, W, 3) of every frame of a GIF (Pillow) or an MP4 (OpenCV), decoded from the file."""
    if path.suffix == ".gif":
        with PIL.Image.open(path) as gif:
            return [np.asarray(frame.convert("RGB")).shape for frame in PIL.ImageSequence.Iterator(gif)]
    capture, shapes = cv2.VideoCapture(str(path)), []
    while (frame := capture.read()[1]) is not None:
        shapes.append(frame.shape)
    return shapes


# --- learning: the whole of Algorithm 1 solves a small game ---------------------------------------------------------
# First in the file, though it uses CatchBall (env section): the slowest test starts first, so that with two workers
# (pytest-xdist, `-n auto` in pyproject.toml) the rest of the suite runs beside it.


# The tiny preset, shrunk to the game: 16 tokens of a 16-code vocabulary, episodes of 4 steps. Same code path.
# What it took (README "Does it learn?"): squared errors, without which D draws no ball; no dropout in this small G,
# which with 0.1 learned the dynamics 3x slower; 64 segments per G batch; G after the tokenizer's first 180 steps.
# 8x8 frames (each grid cell 2x2 pixels) cost a 64th of 64x64's in E, D and π's convs, whose one halving and one
# pooling leave one token and one feature per cell; a one-layer G, which learned the dynamics as fast as two layers
# at half the cost; 32 trajectories per actor-critic batch. Greedy final evaluation over 200 episodes.
# fmt: off
CATCH_CONFIG = {
    "epochs": 20, "collection_epochs": 20, "env_steps_per_epoch": 100, "training_steps_per_epoch": 60,
    "start_tokenizer_after_epochs": 0, "start_world_model_after_epochs": 3, "start_actor_critic_after_epochs": 6,
    "tokenizer_batch_size": 16, "world_model_batch_size": 64, "actor_critic_batch_size": 32,
    "learning_rate": 1e-3, "eval_every": 1000, "eval_episodes": 8, "final_eval_episodes": 200, "eval_envs": 8,
    "media_trajectories": 2, "eval_temperature": 0.0,
    "env.frame_size": 8, "tokenizer.resolution": 8, "tokenizer.ch_mult": (1, 1),
    "tokenizer.ch": 16, "tokenizer.num_res_blocks": 1, "tokenizer.attn_resolutions": (), "tokenizer.z_channels": 16,
    "tokenizer.vocab_size": 16, "tokenizer.embed_dim": 16, "tokenizer.perceptual_weight": 0.0,
    "tokenizer.reconstruction_loss": "l2",
    "world_model.max_timesteps": 4, "world_model.embed_dim": 64, "world_model.num_layers": 1,
    "world_model.num_heads": 2, "world_model.embed_dropout": 0.0, "world_model.attn_dropout": 0.0,
    "world_model.resid_dropout": 0.0,
    "actor_critic.conv_channels": (16,), "actor_critic.lstm_dim": 64, "actor_critic.burn_in": 2,
    "actor_critic.imagination_horizon": 4,
}
# fmt: on


def train_catch(tmp_path: Path, seed: int = 0, **overrides) -> tuple[float, train.Run]:
    """Algorithm 1 from scratch on CatchBall (train.new_run + train.training_loop): the final evaluation's return."""
    config = agent_lib.IRISConfig()
    for name, value in {**CATCH_CONFIG, **overrides}.items():
        agent_lib.set_field(config, name, value)
    config.game, config.seed, config.device, config.out = CATCH_ID, seed, "cpu", str(tmp_path / f"catch{seed}")
    run = train.new_run(config)
    train.training_loop(run)
    final = json.loads((run.run_dir / "final_eval.json").read_text())
    return final["mean_return"], run


def test_train_learns_to_catch_the_ball(tmp_path, one_thread):
    """The whole loop learns: after 2,000 real steps the greedy agent catches most balls; random play loses.

    The slowest test (minutes): Algorithm 1 from scratch, every phase. It fails when the policy gradient's sign is
    flipped or the λ-return recursion runs forward (checked by hand: README "Does it learn?")."""
    random_return = catch_random_policy_return()
    mean_return, run = train_catch(tmp_path)
    print(
        f"CatchBall: final return {mean_return:.3f} (optimum 1, random policy {random_return:.3f}); "
        f"last epoch {train.summary_line(run.history[-1])}"
    )
    assert random_return == pytest.approx(-0.5)  # every start and action sequence of CatchBall, counted
    assert mean_return > 0.6  # seed 0: 1.00 over the 200 greedy episodes; seeds 1 to 4: 0.71 to 1.00 (README)


# ---------------------------------------------------------------------------------------------------------------------
# env.py and replay.py: the Atari 100k protocol and the dataset D (Section 3.1, Algorithm 1)
# ---------------------------------------------------------------------------------------------------------------------


def test_env_frames_are_64x64_rgb_uint8_and_pong_has_6_actions():
    for is_train in (True, False):
        env = make_env("Pong", train=is_train, seed=0)
        obs, _ = env.reset()
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
        assert env.observation_space.shape == (64, 64, 3)
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8 and obs.max() > 0
        assert env.action_space.n == 6  # minimal action set
        env.close()


def test_env_game_names_are_canonicalised():
    for name in ("Pong", "pong", "ALE/Pong-v5", "PongNoFrameskip-v4"):
        assert canonical_game(name) == "Pong"
    assert canonical_game("kung_fu_master") == "KungFuMaster"
    assert len(ATARI_100K_GAMES) == 26
    assert all(canonical_game(game) == game for game in ATARI_100K_GAMES)


def test_env_unknown_game_names_the_closest_games():
    with pytest.raises(ValueError, match="Breakout"):
        make_env("Breakot")
    with pytest.raises(ValueError, match="SpaceInvaders"):
        canonical_game("SpaceInvader")


class CatchBall(gym.Env):
    """Catch the falling ball, drawn in 64x64 RGB frames: a 4x4 grid of 16x16-pixel cells, one token per cell.

    The ball starts in a random column of the top row and falls one row per step; the paddle, in a random column of
    the bottom row, moves left, stays or moves right. Once the ball is in the bottom row (after three moves), the next
    step ends the episode with r = +1 if the paddle is under it (visible: the ball turns green), else -1.
    Every start can be caught: the optimum return is +1.
    """

    GRID = 4
    MOVES = (0, -1, 1)  # actions: stay, left, right

    def __init__(self, cell: int = 16) -> None:
        self.cell = cell  # pixels per cell: 16 gives 64x64 frames
        self.observation_space = gym.spaces.Box(0, 255, (self.GRID * cell, self.GRID * cell, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(len(self.MOVES))
        self.ball_row = self.ball_col = self.paddle = 0

    def _obs(self) -> np.ndarray:
        frame = np.zeros(self.observation_space.shape, dtype=np.uint8)
        c, bottom = self.cell, self.GRID - 1
        caught = self.ball_row == bottom and self.ball_col == self.paddle
        frame[bottom * c :, self.paddle * c : (self.paddle + 1) * c] = (40, 120, 255)  # the paddle, blue
        colour = (0, 255, 0) if caught else (255, 220, 0)  # the ball, yellow; green once caught
        frame[self.ball_row * c : (self.ball_row + 1) * c, self.ball_col * c : (self.ball_col + 1) * c] = colour
        return frame

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.ball_row = 0
        self.ball_col, self.paddle = (int(x) for x in self.np_random.integers(self.GRID, size=2))
        return self._obs(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.ball_row == self.GRID - 1:  # the ball is in the bottom row: caught or missed
            return self._obs(), (1.0 if self.paddle == self.ball_col else -1.0), True, False, {}
        self.paddle = int(np.clip(self.paddle + self.MOVES[int(action)], 0, self.GRID - 1))
        self.ball_row += 1
        return self._obs(), 0.0, False, False, {}


CATCH_ID = "CatchBall-v0"
for env_id, cell in ((CATCH_ID, 16), ("CatchBall96-v0", 24)):  # 64x64 frames, and 96x96 ones for env.py to resize
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=CatchBall, kwargs={"cell": cell})


def catch_random_policy_return() -> float:
    """The exact expected return of the uniformly random policy: every start and action sequence, equally likely."""
    env, total, count = CatchBall(), 0.0, 0
    for ball, paddle in itertools.product(range(CatchBall.GRID), repeat=2):
        for actions in itertools.product(range(3), repeat=CatchBall.GRID):
            env.ball_row, env.ball_col, env.paddle = 0, ball, paddle
            total += sum(env.step(a)[1] for a in actions)
            count += 1
    return total / count


def test_env_other_gymnasium_envs_with_rgb_frames():
    """Any registered env with (H, W, 3) uint8 frames: resized to 64x64, episodes capped; others are refused."""
    assert canonical_game(CATCH_ID) == CATCH_ID and canonical_game("PongNoFrameskip-v4") == "Pong"
    for env_id in (CATCH_ID, "CatchBall96-v0"):
        env = make_env(env_id, train=True, seed=0)
        obs, _ = env.reset()
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8 and env.observation_space.shape == (64, 64, 3)
        assert obs[56, 8:56].any(axis=-1).sum() == 16  # the paddle: one cell of the bottom row, at any frame size
    config = EnvConfig(max_train_frames=2)
    assert make_env(CATCH_ID, train=True, config=config, seed=0).step(0)[3] is False
    env = make_env(CATCH_ID, train=True, config=config, seed=0)
    assert [env.step(0)[3] for _ in range(2)] == [False, True]  # truncated after max_train_frames steps
    returns = run_episodes(
        CATCH_ID, lambda obs, first: np.zeros(len(obs), dtype=np.int64), 6, num_envs=2, seed=0, progress=False
    )
    assert len(returns) == 6 and set(returns) <= {-1.0, 1.0}
    with pytest.raises(ValueError, match=r"RGB frames, a Box of shape \(H, W, 3\)"):
        make_env("CartPole-v1")
    assert action_names(CATCH_ID) == ["0", "1", "2"]  # no names of its own: the indices
    assert action_names("Pong") == ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]


def test_env_module_colon_id_registers_a_users_env_for_train_py(tmp_path, monkeypatch):
    """`--game my_envs:Catch64-v0` imports my_envs, whose gymnasium.register call makes the id known (the way a
    train.py process, which never imports test_iris.py, gets a user's environment)."""
    (tmp_path / "my_envs.py").write_text(
        "import gymnasium\ngymnasium.register('Catch64-v0', entry_point='test_iris:CatchBall', kwargs={'cell': 16})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert canonical_game("my_envs:Catch64-v0") == "my_envs:Catch64-v0"
    obs, _ = make_env("my_envs:Catch64-v0", seed=0).reset()
    assert obs.shape == (64, 64, 3) and obs[56, 8:56].any(axis=-1).sum() == 16


def _fire_or_noop(rng: np.random.Generator) -> int:
    return int(rng.random() < 0.5)  # Breakout: 0 = NOOP, 1 = FIRE (launches the ball, which then gets missed)


def test_env_breakout_life_loss_ends_episode_but_game_goes_on():
    env = make_env("Breakout", train=True, seed=0)
    rng = np.random.default_rng(0)
    obs, info = env.reset()
    assert info["lives"] == 5
    episodes, frame_number = 0, info["episode_frame_number"]
    while True:
        obs, reward, terminated, truncated, info = env.step(_fire_or_noop(rng))
        assert not truncated
        if terminated:
            episodes += 1
            if info["game_over"]:
                break
            assert info["lives"] == 5 - episodes
            obs, info = env.reset()
            # Not a fresh start: the lives counter stays down and the game's frame counter keeps running.
            assert info["lives"] == 5 - episodes
            assert info["episode_frame_number"] > frame_number
            frame_number = info["episode_frame_number"]
    assert episodes == 5  # one game of 5 lives, 5 learner episodes
    obs, info = env.reset()  # a real game over restarts the game
    assert info["lives"] == 5 and info["episode_frame_number"] < frame_number


def test_env_test_env_does_not_end_on_life_loss():
    env = make_env("Breakout", train=False, seed=0)
    rng = np.random.default_rng(0)
    env.reset()
    lives_seen = set()
    while True:
        obs, reward, terminated, truncated, info = env.step(_fire_or_noop(rng))
        lives_seen.add(info["lives"])
        if terminated or truncated:
            break
    assert terminated and info["lives"] == 0
    assert lives_seen >= {1, 2, 3, 4, 5}  # all five lives were lost within one episode


def test_env_episode_caps_count_frames():
    # No no-ops here, so a cap of 400 frames is exactly 100 agent steps of 4 frames.
    config = EnvConfig(noop_max=0, test_noop_max=0, max_train_frames=400, max_test_frames=200)
    for is_train, steps in ((True, 100), (False, 50)):
        env = make_env("Pong", train=is_train, seed=0, config=config)
        env.reset()
        for t in range(1, steps + 1):
            _, _, terminated, truncated, _ = env.step(0)
            assert not terminated and truncated == (t == steps)
    assert EnvConfig().max_train_frames == 20_000 and EnvConfig().max_test_frames == 108_000


def test_env_test_noop_max_one_is_the_reference_test_protocol():
    """test_noop_max = 1: every test game starts after exactly one no-op (the authors' env.test.noop_max = 1)."""
    reference = EnvConfig(test_noop_max=1)
    starts = {
        make_env("Pong", train=False, seed=s, config=reference).unwrapped.ale.getEpisodeFrameNumber() for s in range(4)
    }
    assert starts == {1}
    ours = {make_env("Pong", train=False, seed=s).unwrapped.ale.getEpisodeFrameNumber() for s in range(4)}
    assert len(ours) > 1 and all(1 <= n <= 30 for n in ours)  # 1 to 30 no-ops by default
    assert make_env("Pong", train=True, seed=0, config=reference).unwrapped.ale.getEpisodeFrameNumber() > 1


def _deterministic_policy(obs: np.ndarray) -> np.ndarray:
    return (obs.reshape(len(obs), -1).sum(axis=1) % 4).astype(np.int64)  # varied, yet a function of the frame


def test_env_run_episodes_returns_exactly_the_requested_episodes():
    firsts, dones = [], []

    def policy(obs, first):
        assert obs.shape == (2, 64, 64, 3) and first.shape == (2,)
        firsts.append(first.copy())
        return _deterministic_policy(obs)

    def on_step(obs, actions, rewards, done):
        dones.append(done.copy())

    returns = run_episodes("Breakout", policy, num_episodes=3, num_envs=2, seed=3, progress=False, on_step=on_step)
    assert len(returns) == 3
    assert firsts[0].all()
    # first marks exactly the steps after an episode ended: no step lost or counted twice.
    np.testing.assert_array_equal(np.array(firsts[1:]), np.array(dones[:-1]))
    # The same episodes played one env at a time (env i seeded with seed + i; env 0 plays 2, env 1 plays 1).
    expected = []
    for i, share in ((0, 2), (1, 1)):
        env = make_env("Breakout", train=False, seed=3 + i)
        obs, _ = env.reset()
        for _ in range(share):
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(_deterministic_policy(obs[None])[0])
                total, done = total + reward, terminated or truncated
            expected.append(total)
            obs, _ = env.reset()
    assert sorted(returns) == sorted(expected)


# ---------------------------------------------------------------------------------------------------------------
# replay.py


def _frame(step: int) -> np.ndarray:
    """An HWC frame that encodes its step index, so segments can be checked against what was added."""
    frame = np.zeros((64, 64, 3), dtype=np.uint8)
    frame[0, 0] = (step % 251 + 1, step // 251 + 1, 7)
    return frame


def _filled_buffer(lengths: list[int], last_open: bool = True, **kwargs) -> ReplayBuffer:
    buffer = ReplayBuffer(**kwargs)
    step = 0
    for e, length in enumerate(lengths):
        for t in range(length):
            last = t == length - 1 and not (last_open and e == len(lengths) - 1)
            buffer.add(
                _frame(step),
                action=step % 5,
                reward=float(step),
                terminated=last and e % 2 == 0,
                truncated=last and e % 2 == 1,
            )
            step += 1
    return buffer


def _step_ids(observations: torch.Tensor) -> torch.Tensor:
    """Inverse of _frame: (B, T, 3, 64, 64) -> (B, T) step index, -1 on all-zero padding."""
    pixel = observations[:, :, :, 0, 0].long()  # (B, T, 3)
    return torch.where(pixel[..., 2] == 7, pixel[..., 0] - 1 + 251 * (pixel[..., 1] - 1), -1)


@pytest.mark.parametrize("from_start", [True, False])
def test_replay_segments_equal_what_was_added(from_start):
    lengths = [7, 2, 12, 5]  # the last episode is still being collected
    buffer = _filled_buffer(lengths, chunk_size=8)
    assert len(buffer) == sum(lengths) and buffer.num_episodes == 4 and buffer.episode_lengths == lengths
    episode_of = np.repeat(np.arange(4), lengths)
    last_step = np.cumsum(lengths) - 1
    batch = buffer.sample(512, 6, sample_from_start=from_start)
    assert batch["observations"].shape == (512, 6, 3, 64, 64) and batch["observations"].dtype == torch.uint8
    assert batch["actions"].dtype == torch.int64 and batch["rewards"].dtype == torch.float32
    assert batch["ends"].dtype == torch.int64 and batch["mask"].dtype == torch.bool
    ids, mask = _step_ids(batch["observations"]), batch["mask"]
    assert torch.equal(ids >= 0, mask)
    seen = set()
    for row_ids, row_mask, actions, rewards, ends in zip(ids, mask, batch["actions"], batch["rewards"], batch["ends"]):
        real = row_ids[row_mask].numpy()
        assert len(real) > 0 and np.all(np.diff(real) == 1)  # consecutive steps
        assert len(set(episode_of[real])) == 1  # of one episode
        seen.add(int(episode_of[real[0]]))
        assert torch.equal(actions[row_mask], torch.as_tensor(real % 5))
        assert torch.equal(rewards[row_mask], torch.as_tensor(real, dtype=torch.float32))
        expected_ends = [int(s in last_step and episode_of[s] % 2 == 0 and episode_of[s] != 3) for s in real]
        assert ends[row_mask].tolist() == expected_ends
        assert not actions[~row_mask].any() and not rewards[~row_mask].any() and not ends[~row_mask].any()
    assert seen == {0, 1, 2, 3}  # the open episode is sampled too


def test_replay_masks_pad_at_the_end_or_at_the_start():
    buffer = _filled_buffer([3], last_open=False)
    forward = buffer.sample(200, 5, sample_from_start=True)["mask"]
    backward = buffer.sample(200, 5, sample_from_start=False)["mask"]
    forward_rows = {tuple(r) for r in forward.int().tolist()}
    backward_rows = {tuple(r) for r in backward.int().tolist()}
    assert forward_rows == {(1, 1, 1, 0, 0), (1, 1, 0, 0, 0), (1, 0, 0, 0, 0)}
    assert backward_rows == {(0, 0, 0, 0, 1), (0, 0, 0, 1, 1), (0, 0, 1, 1, 1)}
    full = buffer.sample(50, 3, sample_from_start=False)
    assert full["mask"][:, -1].all()  # the last step is always real when padding is at the start


def test_replay_chooses_episodes_uniformly():
    buffer = _filled_buffer([2, 60], last_open=False)
    ids = _step_ids(buffer.sample(4000, 1)["observations"])[:, 0]
    share_short = (ids < 2).float().mean().item()
    assert 0.45 < share_short < 0.55  # per episode, not per step (which would give 2/62)


def test_replay_grows_in_chunks_and_samples_frames():
    buffer = _filled_buffer([10], chunk_size=4)
    assert buffer.capacity == 12 and len(buffer) == 10
    frames = buffer.sample_frames(64)
    assert frames.shape == (64, 3, 64, 64) and frames.dtype == torch.uint8
    assert set(_step_ids(frames[:, None])[:, 0].tolist()) <= set(range(10))


def test_replay_truncate_and_close_episode():
    buffer = _filled_buffer([4, 3, 5])
    buffer.truncate(7)  # exactly the first two episodes, both closed
    assert buffer.episode_lengths == [4, 3]
    buffer.add(_frame(99), 0, 0.0, False)
    assert buffer.episode_lengths == [4, 3, 1]
    buffer.truncate(5)  # cuts the second episode: it is open again
    buffer.add(_frame(98), 0, 0.0, False)
    assert buffer.episode_lengths == [4, 2]
    buffer.close_episode()
    buffer.add(_frame(97), 0, 0.0, False)
    assert buffer.episode_lengths == [4, 2, 1]


def test_replay_last_frames_of_the_open_episode_left_padded():
    buffer = _filled_buffer([4, 2])  # steps 0-3 closed, steps 4-5 open
    frames, mask = buffer.last_frames(3)
    assert mask.tolist() == [False, True, True]  # 2 frames in the episode: left-padded to 3
    assert frames[0].eq(0).all() and torch.equal(frames[1:], buffer.observations[4:6])
    frames, mask = _filled_buffer([6]).last_frames(3)  # a longer episode: its last 3 frames
    assert mask.all() and frames[:, 0, 0, 0].tolist() == [4, 5, 6]  # _frame(step) stores step + 1
    _, mask = _filled_buffer([4, 2], last_open=False).last_frames(3)
    assert not mask.any()  # no open episode: the next step starts a new one, with a blank LSTM state
    assert _filled_buffer([4]).last_frames(0)[0].shape == (0, 3, 64, 64)


def test_replay_save_load_round_trip(tmp_path):
    buffer = _filled_buffer([5, 9, 4], chunk_size=1000)
    path = tmp_path / "replay"
    buffer.save(path)
    assert [p.name for p in path.iterdir()] == ["steps_0000000000.pt"]  # no temporary file left behind
    assert (path / "steps_0000000000.pt").stat().st_size < 100 * 3 * 64 * 64  # the filled part, not 1000 steps
    loaded = ReplayBuffer.load(path)
    assert len(loaded) == 18 and loaded.episode_lengths == [5, 9, 4]
    for name in ("observations", "actions", "rewards", "ends"):
        assert torch.equal(loaded._data[name][:18], buffer._data[name][:18])
    loaded.add(_frame(18), 0, 0.0, True)  # the open episode goes on after loading
    assert loaded.episode_lengths == [5, 9, 5]


def test_replay_truncated_or_corrupt_file_is_refused(tmp_path):
    buffer = _filled_buffer([30, 20])
    buffer.save(tmp_path)
    buffer.add(_frame(50), 0, 0.0, False)
    buffer.save(tmp_path)
    last = tmp_path / "steps_0000000050.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="steps_0000000050.pt"):
        ReplayBuffer.load(tmp_path)
    assert len(ReplayBuffer.load(tmp_path, num_steps=50)) == 50  # the steps a checkpoint names are intact
    last.write_bytes(data)
    path = tmp_path / "steps_0000000000.pt"
    data = path.read_bytes()
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0xFF  # one byte of the stored frames, which fill most of the file
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="steps_0000000000.pt"):
        ReplayBuffer.load(tmp_path, num_steps=50)
    path.unlink()
    with pytest.raises(ValueError, match="steps_0000000050.pt does not follow .* chunk is missing"):
        ReplayBuffer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        ReplayBuffer.load(tmp_path / "missing")


def test_replay_save_appends_only_the_new_steps(tmp_path):
    """Each save writes one chunk file with the steps added since the last one; earlier chunks are never rewritten.
    A resumed buffer (cut to the steps of its checkpoint) replaces the chunk past the cut, then deletes later ones."""
    buffer = _filled_buffer([30, 20])
    buffer.save(tmp_path)
    first = tmp_path / "steps_0000000000.pt"
    written = first.stat().st_mtime_ns, first.stat().st_ino
    for step in range(50, 60):
        buffer.add(_frame(step), 0, 0.0, False)
    buffer.save(tmp_path)
    buffer.save(tmp_path)  # no new step: nothing written
    buffer.add(_frame(60), 1, 1.0, True)
    buffer.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "steps_0000000000.pt",
        "steps_0000000050.pt",
        "steps_0000000060.pt",
    ]
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == written
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    step_bytes = 3 * 64 * 64 + 8 + 4 + 1  # x_t, a_t, r_t, d_t: each chunk grows with its new steps only
    assert sizes["steps_0000000050.pt"] - sizes["steps_0000000060.pt"] == pytest.approx(9 * step_bytes, rel=0.02)
    assert sizes["steps_0000000000.pt"] - sizes["steps_0000000050.pt"] == pytest.approx(40 * step_bytes, rel=0.02)
    loaded = ReplayBuffer.load(tmp_path)
    assert len(loaded) == 61 and loaded.episode_lengths == [30, 31]
    for name in ("observations", "actions", "rewards", "ends"):
        assert torch.equal(loaded._data[name][:61], buffer._data[name][:61])
    resumed = ReplayBuffer.load(tmp_path, num_steps=55)  # a checkpoint of 55 steps: the last chunk is not read
    assert len(resumed) == 55 and resumed.episode_lengths == [30, 25]
    resumed.add(_frame(99), 2, 0.0, True)
    resumed.save(tmp_path)  # steps 50 to 55 again, then the new one; the chunk of step 60 no checkpoint names goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps_0000000000.pt", "steps_0000000050.pt"]
    again = ReplayBuffer.load(tmp_path)
    assert len(again) == 56 and again.episode_lengths == [30, 26] and again._data["actions"][55] == 2


def test_replay_holds_real_steps(pong):
    """Real Pong steps in, the same steps out: every stored field, and sampled segments that are windows of the play."""
    replay = pong_replay(pong, steps=150, episode=60)
    assert len(replay) == 150 and replay.episode_lengths == [60, 60, 30]
    assert torch.equal(replay.observations, pong.frames[:150])
    assert torch.equal(replay._data["actions"][:150], pong.actions[:150])
    assert torch.equal(replay._data["rewards"][:150], pong.rewards[:150])
    torch.manual_seed(0)
    batch = replay.sample(8, 20, sample_from_start=True)
    for frames, actions, mask in zip(batch["observations"], batch["actions"], batch["mask"]):
        length = int(mask.sum())  # real steps first, then padding past the episode's end
        assert mask[:length].all() and not frames[length:].any()
        starts = [t for t in range(150) if length == min(20, min(t // 60 * 60 + 60, 150) - t)]
        assert any(
            torch.equal(frames[:length], pong.frames[t : t + length])
            and torch.equal(actions[:length], pong.actions[t : t + length])
            for t in starts
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_replay_samples_on_the_gpu():
    buffer = _filled_buffer([5, 9], device="cuda")
    batch = buffer.sample(4, 6, sample_from_start=False)
    assert all(v.device.type == "cuda" for v in batch.values())
    assert buffer.sample(4, 6, device="cpu")["observations"].device.type == "cpu"


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer.py: the discrete autoencoder (Section 2.1, Appendix A.1)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_tokenizer() -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer(TokenizerConfig()).eval()


@pytest.fixture(scope="module")
def vgg_tokenizer() -> Tokenizer:
    """The tiny tokenizer with L_perceptual on a randomly initialised VGG (pretrained weights would need a download)."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(perceptual_weight=1.0, pretrained_vgg=False)
    tokenizer.perceptual_net()
    return tokenizer


def test_tokenizer_shapes_dtypes_paper_config(paper_tokenizer):
    config = paper_tokenizer.config
    assert config.tokens_per_frame == 16  # K, Table 3
    frames = random_frames(2, 2)  # (B, T, 3, 64, 64)
    with torch.no_grad():
        tokens = paper_tokenizer.encode(frames)
        assert tokens.shape == (2, 2, 16) and tokens.dtype == torch.int64  # leading dims (B, T) are kept
        assert tokens.min() >= 0 and tokens.max() < config.vocab_size
        assert torch.equal(paper_tokenizer.encode(frames.flatten(0, 1)), tokens.flatten(0, 1))  # (B*T, K)
        assert torch.equal(paper_tokenizer.encode(frames.float() / 255), tokens)  # uint8 or float in [0, 1]
        decoded = paper_tokenizer.decode(tokens)
        assert decoded.shape == (2, 2, 3, 64, 64) and decoded.dtype == torch.float32
        assert decoded.min() >= 0 and decoded.max() <= 1
        assert torch.allclose(paper_tokenizer.encode_decode(frames[:, 0]), decoded[:, 0])
    with pytest.raises(ValueError, match="channels first"):
        paper_tokenizer.encode(frames[:, 0].permute(0, 2, 3, 1))  # HWC env observations


def test_tokenizer_parameter_count_paper_config(paper_tokenizer):
    count = sum(p.numel() for p in paper_tokenizer.parameters())
    print(f"tokenizer parameters at the paper config: {count:,}")
    assert 3_000_000 < count < 6_000_000  # about 4M (encoder, decoder, codebook, pre/post quantization convs)
    assert paper_tokenizer.embedding.weight.shape == (512, 512)  # N x d, Table 3


def test_tokenizer_codebook_init_uniform():
    weight = tiny_tokenizer().embedding.weight  # U(-1/N, 1/N), (N, d) = (64, 32): 2,048 draws come within 1% of 1/N
    assert 0.99 / 64 < weight.abs().max() <= 1 / 64 and abs(weight.mean()) < 0.1 / 64


def test_tokenizer_codebook_lookup_equals_brute_force_argmin():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    torch.nn.init.normal_(tokenizer.embedding.weight)  # well-separated codes, so no near-ties
    y = torch.randn(3, 32, 4, 4)  # E(x), (B, d, h, w)
    tokens = tokenizer._quantize(y)  # (B, K)
    y_k = y.permute(0, 2, 3, 1).reshape(3, 16, 1, 32).double()  # (B, K, 1, d), k = row * w + column
    e = tokenizer.embedding.weight.double()  # (N, d)
    brute = ((y_k - e) ** 2).sum(-1).sqrt().argmin(-1)  # argmin_i ||y^k - e_i||_2, (B, K)
    assert torch.equal(tokens, brute)
    # Through the whole encoder too
    frames = random_frames(2)
    with torch.no_grad():
        y = tokenizer._encode_continuous(tokenizer._preprocess(frames))
        brute = torch.cdist(y.flatten(2).transpose(1, 2).double(), e).argmin(-1)  # (B, K)
        assert torch.equal(tokenizer.encode(frames), brute)


def test_tokenizer_straight_through_reaches_encoder():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    tokenizer.loss(random_frames(2))["reconstruction"].backward()
    for name, p in [*tokenizer.encoder.named_parameters(), *tokenizer.pre_quant_conv.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert tokenizer.embedding.weight.grad is None  # the L1 term never moves the codebook


def test_tokenizer_commitment_terms_hand_computed():
    y = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)  # E(x)
    z_q = torch.tensor([0.0, 2.0, 5.0, 3.0], requires_grad=True)  # e(z)
    codebook, commitment = commitment_losses(y, z_q)
    # differences 1, 0, -2, 1 -> squares 1, 0, 4, 1 -> mean 1.5
    assert codebook.item() == pytest.approx(1.5) and commitment.item() == pytest.approx(1.5)
    codebook.backward()  # ||sg(E(x)) - e(z)||^2 moves e(z) only: d/dz_q = 2 (z_q - y) / 4
    assert y.grad is None
    assert torch.allclose(z_q.grad, torch.tensor([-0.5, 0.0, 1.0, -0.5]))
    z_q.grad = None
    commitment.backward()  # ||sg(e(z)) - E(x)||^2 moves E(x) only: d/dy = 2 (y - z_q) / 4
    assert z_q.grad is None
    assert torch.allclose(y.grad, torch.tensor([0.5, 0.0, -1.0, 0.5]))


@pytest.mark.parametrize(
    "term, moved, frozen", [("codebook", "embedding", "encoder"), ("commitment", "encoder", "embedding")]
)
def test_tokenizer_commitment_gradients_in_model(term, moved, frozen):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    tokenizer.loss(random_frames(2))[term].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(tokenizer, moved).parameters())
    assert all(p.grad is None for p in getattr(tokenizer, frozen).parameters())
    assert all(p.grad is None for p in tokenizer.decoder.parameters())


def test_tokenizer_perceptual_random_vgg(vgg_tokenizer):
    net = vgg_tokenizer.perceptual_net()
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # in [-1, 1]; small images: VGG is the slow part of these tests
    assert torch.allclose(net(x, x), torch.zeros(2), atol=1e-6)
    y = torch.rand(2, 3, 32, 32, requires_grad=True)
    distance = net(x, y)
    assert (distance > 0).all()
    distance.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    # Inside the tokenizer's loss: a term of its own, and VGG stays out of training, parameters and checkpoints.
    vgg_tokenizer.train()
    losses = vgg_tokenizer.loss(random_frames(1))
    assert losses["perceptual"] > 0 and losses["perceptual"].requires_grad
    losses["perceptual"].backward()
    assert not net.training
    assert all(p.grad is None for p in net.parameters())
    assert all(p.grad is not None for p in vgg_tokenizer.decoder.parameters())
    vgg_ids = {id(p) for p in net.parameters()}
    assert not vgg_ids & {id(p) for p in vgg_tokenizer.parameters()}
    state = vgg_tokenizer.state_dict()
    assert not any("perceptual" in k or "features" in k for k in state)
    tiny_tokenizer().load_state_dict(state)  # strict: same keys


@pytest.mark.filterwarnings("ignore::UserWarning")  # lpips calls vgg16(pretrained=False), deprecated in torchvision
def test_tokenizer_perceptual_equals_lpips_package(vgg_tokenizer, monkeypatch):
    import lpips  # the package whose linear-layer weights L_perceptual reads

    reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()  # real lin0..lin4
    net = vgg_tokenizer.perceptual_net()
    # The same random VGG16 trunk in both: LPIPS's net.slice{s}.{i} is vgg16().features[i].
    net.features.load_state_dict({key.split(".", 1)[1]: value for key, value in reference.net.state_dict().items()})
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.rand(3, 3, 64, 64, generator=generator) * 2 - 1 for _ in range(2))  # frames in [-1, 1]
    with torch.no_grad():
        expected = reference(x, y).flatten()  # (B, 1, 1, 1) -> (B,)
        assert torch.allclose(net(x, y), expected, rtol=0, atol=1e-5), (net(x, y), expected)
    assert all((lin.weight >= 0).all() for lin in net.lins) and not net.training
    # perceptual_dropout = 0.5 is the reference's LPIPS in train mode: the same dropout masks from the same seed.
    reference.train()
    with torch.no_grad():
        noisy = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            expected = reference(x, y).flatten()
            torch.manual_seed(seed)
            noisy.append(net(x, y, dropout=0.5))
            torch.testing.assert_close(noisy[-1], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(noisy[0], noisy[1])  # a noisy distance
    # Without the lpips package, a message that says what to install (or how to train without the term).
    monkeypatch.setattr(tokenizer_module, "LPIPS_WEIGHTS", "no-such-file.pth")
    with pytest.raises(RuntimeError, match="pip install lpips.*perceptual_weight 0"):
        PerceptualLoss(pretrained=False)


def test_tokenizer_loss_terms_computed_by_hand(vgg_tokenizer):
    """Appendix A.1's four terms, each written out from E, the codebook and D: means over elements (as the reference),
    in the network's [-1, 1] space; the codebook's use as logged."""
    frames = random_frames(2)
    losses = vgg_tokenizer.loss(frames)
    terms = ["reconstruction", "codebook", "commitment", "perceptual"]
    assert set(losses) == {"total", *terms, "codebook_perplexity", "codebook_usage"}
    assert all(losses[k].requires_grad for k in ["total", *terms])
    assert not losses["codebook_perplexity"].requires_grad and not losses["codebook_usage"].requires_grad
    with torch.no_grad():
        x = frames.float() / 255 * 2 - 1
        y = vgg_tokenizer._encode_continuous(x)  # E(x), (B, d, 4, 4)
        tokens = torch.cdist(y.flatten(2).transpose(1, 2), vgg_tokenizer.embedding.weight).argmin(-1)  # z, (B, K)
        z_q = vgg_tokenizer.embedding(tokens).transpose(1, 2).reshape(y.shape)  # e(z)
        decoded = vgg_tokenizer._decode_continuous(z_q)  # D(z)
        expected = {
            "reconstruction": (x - decoded).abs().mean(),
            "codebook": (y - z_q).pow(2).mean(),
            "commitment": (y - z_q).pow(2).mean(),
            "perceptual": vgg_tokenizer.perceptual_net()(x, decoded).mean(),
        }
        expected["total"] = sum(expected.values())
        for name, value in expected.items():
            torch.testing.assert_close(losses[name].detach(), value, msg=name)
        counts = torch.bincount(tokens.flatten(), minlength=64).double()
        p = counts[counts > 0] / counts.sum()
        assert losses["codebook_usage"].item() == pytest.approx(len(p) / 64)
        assert losses["codebook_perplexity"].item() == pytest.approx(math.exp(-(p * p.log()).sum()), rel=1e-5)


@pytest.mark.parametrize("reconstruction_loss", RECONSTRUCTION_LOSSES)
def test_tokenizer_pixel_weights_scale_each_pixels_reconstruction_error(reconstruction_loss):
    """learn.py --foreground_weight's pixel weights (B, 1, 64, 64): each pixel's |error| (or squared error) times its
    weight, over all elements; in loss(), only the reconstruction term changes."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(perceptual_weight=0.0, reconstruction_loss=reconstruction_loss)
    error = torch.randn(2, 3, 64, 64)
    weights = torch.ones(2, 1, 64, 64)
    weights[1, 0, 5, 7] = 21.0  # one pixel of the second frame counts 21 times
    per_element = error.abs() if reconstruction_loss == "l1" else error.pow(2)
    by_hand = (per_element.sum() + 20 * per_element[1, :, 5, 7].sum()) / error.numel()
    assert tokenizer.reconstruction_term(error, weights).item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert tokenizer.reconstruction_term(error).item() == pytest.approx(per_element.mean().item(), rel=1e-5)
    frames = random_frames(2)
    plain, doubled = tokenizer.loss(frames), tokenizer.loss(frames, torch.full((2, 1, 64, 64), 2.0))
    torch.testing.assert_close(doubled["reconstruction"], 2 * plain["reconstruction"])
    torch.testing.assert_close(doubled["total"] - doubled["reconstruction"], plain["total"] - plain["reconstruction"])


def test_tokenizer_offline_vgg_error_names_file_and_switch(monkeypatch, tmp_path):
    import torchvision  # here, as in tokenizer.py: the workers start without it (1.5 s each)

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    # torchvision's own download function: what it raises offline (URLError), without waiting on a network.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    with pytest.raises(RuntimeError) as info:
        PerceptualLoss(pretrained=True)
    message = str(info.value)
    assert tokenizer_module.VGG16_URL == torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    assert "vgg16-397923af.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "--tokenizer.perceptual_weight 0" in message
    # perceptual_weight 0 never builds VGG, so it trains offline
    assert tiny_tokenizer().loss(random_frames(2))["perceptual"] == 0
    # and with the term, the first loss fails loudly, never silently without it
    with pytest.raises(RuntimeError, match="perceptual_weight 0"):
        tiny_tokenizer(perceptual_weight=1.0).loss(random_frames(2))


def catch_frames(count: int, rng: np.random.Generator, cell: int = 16) -> torch.Tensor:
    """CatchBall's frames, ball and paddle anywhere on the 4x4 grid: (count, 3, 4 cell, 4 cell) uint8."""
    env, frames = CatchBall(cell), []
    for _ in range(count):
        env.ball_row, env.ball_col, env.paddle = (int(x) for x in rng.integers(CatchBall.GRID, size=3))
        frames.append(env._obs())
    return torch.as_tensor(np.stack(frames)).permute(0, 3, 1, 2)


def test_tokenizer_refuses_an_unknown_reconstruction_loss():
    with pytest.raises(ValueError, match="reconstruction_loss must be one of l1, l2, not 'l3'"):
        Tokenizer(TokenizerConfig(reconstruction_loss="l3"))  # it would have trained with squared errors


def test_tokenizer_l2_reconstruction_learns_a_small_object():
    """reconstruction_loss = "l2" draws the ball within 200 steps; with "l1" and no perceptual term, D keeps drawing
    the background (ball error 0.61 here; 0.62 at 64x64 after 300 steps, README "Does it learn?").

    The learning section's tokenizer (N = d = 16, 8x8 frames with 2x2 cells, one halving: K = 16, one token per
    cell) on CatchBall's frames.
    """
    torch.manual_seed(0)
    catch = {name.split(".")[1]: value for name, value in CATCH_CONFIG.items() if name.startswith("tokenizer.")}
    tokenizer = tiny_tokenizer(**catch)
    assert tokenizer.config.resolution == 8 and tokenizer.config.reconstruction_loss == "l2"
    assert tokenizer.config.tokens_per_frame == 16
    cell = tokenizer.config.resolution // CatchBall.GRID  # pixels per grid cell
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    for _ in range(200):
        losses = tokenizer.loss(catch_frames(8, rng, cell=cell))
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
    test = catch_frames(64, rng, cell=cell)
    with torch.no_grad():
        error = (tokenizer.eval().encode_decode(test) - test.float() / 255).abs().mean(1)  # (64, 8, 8)
    ball = (test.amax(1) > 0) & (test[:, 2] == 0)  # the ball's pixels, yellow or green (the paddle is blue)
    print(f"ball error {error[ball].mean():.3f}, background error {error[~ball].mean():.3f}")
    assert error[ball].mean() < 0.2 and error[~ball].mean() < 0.05  # 0.10 here; with l1 the ball is erased (0.61)


def test_tokenizer_learns_real_pong_frames(pong):
    torch.manual_seed(0)
    frames = pong.frames[::8]  # (32, 3, 64, 64) uint8, one every 8 steps
    tokenizer = tiny_tokenizer()
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=3e-3)
    x = frames.float() / 255 * 2 - 1  # the loss's [-1, 1] space
    background = x.flatten(2).median(dim=2).values.median(dim=0).values  # most common colour, (3,)
    background_l1 = (x - background.view(1, 3, 1, 1)).abs().mean().item()
    with torch.no_grad():
        initial = tokenizer.loss(frames)["reconstruction"].item()
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = frames[torch.randperm(len(frames), generator=generator)[:8]]  # minibatches of 8 keep steps cheap
        losses = tokenizer.loss(batch)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
    with torch.no_grad():
        final = tokenizer.loss(frames)["reconstruction"].item()
    print(f"L1 init {initial:.4f} final {final:.4f} constant background frame {background_l1:.4f}")
    # Not compared with the per-pixel mean frame: Pong frames barely differ, so its L1 (about 0.005) is out of
    # reach of a few CPU steps. A constant background frame shows whether the layout (walls, score) is learned.
    assert final < 0.15 * initial
    assert final < 0.5 * background_l1


# ---------------------------------------------------------------------------------------------------------------------
# world_model.py: the Transformer G (Section 2.2, Appendix A.2)
# ---------------------------------------------------------------------------------------------------------------------

NO_DROPOUT = dict(embed_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)


def random_segment(model: WorldModel, batch: int = 2, timesteps: int = 4) -> tuple[torch.Tensor, ...]:
    """Random z_t, a_t, r_t for G's vocabulary and actions, no end, no padding: (obs, actions, rewards, ends, mask)."""
    obs = torch.randint(model.vocab_size, (batch, timesteps, model.tokens_per_frame))
    actions = torch.randint(model.num_actions, (batch, timesteps))
    rewards = torch.randn(batch, timesteps)
    ends = torch.zeros(batch, timesteps, dtype=torch.long)
    mask = torch.ones(batch, timesteps, dtype=torch.bool)
    return obs, actions, rewards, ends, mask


def test_world_model_causality():
    torch.manual_seed(0)
    model = tiny_world_model(tokens_per_frame=4, vocab_size=16, num_actions=3).eval()
    tokens = interleave(*random_segment(model)[:2])  # full context, L(K + 1) = 20 tokens
    with torch.no_grad():
        reference = model(tokens)
        for j in (0, 3, 4, 9, 19):  # frame tokens and action tokens (positions 4, 9, 19)
            changed = tokens.clone()
            changed[:, j] = (changed[:, j] + 1) % model.num_actions  # valid for both tables
            out = model(changed)
            torch.testing.assert_close(out[:, :j], reference[:, :j], rtol=0, atol=0)
            assert not torch.allclose(out[:, j], reference[:, j])


def test_world_model_cache_equals_full_forward():
    torch.manual_seed(0)
    model = WorldModel(WorldModelConfig(), vocab_size=512, tokens_per_frame=16, num_actions=6).eval()  # paper G
    tokens = interleave(*random_segment(model, timesteps=20)[:2])
    assert tokens.shape == (2, 340)
    cache = model.empty_cache()
    with torch.no_grad():
        full = model(tokens)
        # one frame at once (as after reset), then one token at a time, with a multi-token chunk in the middle
        chunks = [tokens[:, :16]] + [tokens[:, i : i + 1] for i in range(16, 100)] + [tokens[:, 100:140]]
        chunks += [tokens[:, i : i + 1] for i in range(140, 340)]
        cached = torch.cat([model(chunk, cache) for chunk in chunks], dim=1)
    assert cache.length == 340
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.head_observations(cached), model.head_observations(full), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        model(tokens[:, :1], cache)  # the context is full


def test_world_model_label_alignment_by_hand():
    torch.manual_seed(0)
    model = tiny_world_model(tokens_per_frame=2, vocab_size=16, num_actions=3, **NO_DROPOUT).eval()
    obs = torch.tensor([[[5, 6], [7, 8], [9, 10]]])  # z_t^k, (1, 3, 2)
    actions = torch.tensor([[1, 2, 0]])
    rewards = torch.tensor([[-3.0, 0.0, 2.5]])  # sign classes 0, 1, 2
    ends = torch.tensor([[0, 0, 1]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    losses = model.loss(obs, actions, rewards, ends, mask)

    # sequence: z_0^1 z_0^2 a_0 | z_1^1 z_1^2 a_1 | z_2^1 z_2^2 a_2   (positions 0..8)
    tokens = torch.tensor([[5, 6, 1, 7, 8, 2, 9, 10, 0]])
    hidden = model(tokens)[0]  # (9, D)
    predicted_by = {0: 6, 2: 7, 3: 8, 5: 9, 6: 10}  # position -> the frame token it predicts, Eq. (1)
    positions, targets = list(predicted_by), list(predicted_by.values())
    transition = F.cross_entropy(model.head_observations(hidden[positions]), torch.tensor(targets))
    action_positions = [2, 5, 8]  # r_t and d_t are predicted at a_t, Eqs. (2)-(3)
    reward = F.cross_entropy(model.head_rewards(hidden[action_positions]), torch.tensor([0, 1, 2]))
    termination = F.cross_entropy(model.head_ends(hidden[action_positions]), torch.tensor([0, 0, 1]))
    torch.testing.assert_close(losses["transition"], transition)
    torch.testing.assert_close(losses["reward"], reward)
    torch.testing.assert_close(losses["termination"], termination)
    torch.testing.assert_close(losses["total"], transition + reward + termination)

    # left padding (step 0): z_1^1 is not predicted from the padded a_0, and r_0, d_0 are not learned
    left = model.loss(obs, actions, rewards, ends, torch.tensor([[False, True, True]]))
    positions, targets = [3, 5, 6], [8, 9, 10]
    torch.testing.assert_close(
        left["transition"], F.cross_entropy(model.head_observations(hidden[positions]), torch.tensor(targets))
    )
    torch.testing.assert_close(
        left["reward"], F.cross_entropy(model.head_rewards(hidden[[5, 8]]), torch.tensor([1, 2]))
    )


def test_world_model_padded_steps_add_nothing():
    torch.manual_seed(0)
    model = tiny_world_model(**NO_DROPOUT)
    obs, actions, rewards, ends, mask = random_segment(model, batch=1)
    mask[:, 2:] = False  # steps 2 and 3 are padding after the episode's last step
    ends[:, 1] = 1
    short = model.loss(obs[:, :2], actions[:, :2], rewards[:, :2], ends[:, :2], mask[:, :2])
    padded = model.loss(obs, actions, rewards, ends, mask)
    garbage_obs, garbage_actions, garbage_rewards, garbage_ends = (
        obs.clone(),
        actions.clone(),
        rewards.clone(),
        ends.clone(),
    )
    garbage_obs[:, 2:] = 3
    garbage_actions[:, 2:] = 2
    garbage_rewards[:, 2:] = -7.0
    garbage_ends[:, 2:] = 1  # ends inside padding are ignored, not counted as a second end
    garbage = model.loss(garbage_obs, garbage_actions, garbage_rewards, garbage_ends, mask)
    for key in ("total", "transition", "reward", "termination"):
        torch.testing.assert_close(padded[key], short[key])
        torch.testing.assert_close(garbage[key], short[key])

    all_padding = model.loss(obs, actions, rewards, ends, torch.zeros_like(mask))
    for key in ("total", "transition", "reward", "termination"):
        assert all_padding[key].item() == 0.0  # no NaN from an empty mean
    all_padding["total"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())


def test_world_model_two_ends_in_a_segment_raise():
    model = tiny_world_model()
    obs, actions, rewards, ends, mask = random_segment(model)
    ends[0, 1] = ends[0, 3] = 1
    with pytest.raises(ValueError, match="at most one episode end"):
        model.loss(obs, actions, rewards, ends, mask)


def test_world_model_real_end_trains_termination_head():
    torch.manual_seed(0)
    model = tiny_world_model(**NO_DROPOUT)
    obs, actions, rewards, ends, mask = random_segment(model)
    ends[0, 3] = 1
    mask[1, 3] = False
    model.loss(obs, actions, rewards, ends, mask)["termination"].backward()
    assert model.head_ends[-1].weight.grad.abs().sum() > 0
    assert model.head_rewards[-1].weight.grad is None  # each term can be backpropagated alone
    optimizer = model.configure_optimizer(3e-3, (0.9, 0.999))
    first = model.loss(obs, actions, rewards, ends, mask)["termination"].item()
    for _ in range(30):
        optimizer.zero_grad()
        model.loss(obs, actions, rewards, ends, mask)["total"].backward()
        optimizer.step()
    assert model.loss(obs, actions, rewards, ends, mask)["termination"].item() < 0.25 * first


def test_world_model_mse_reward_switch():
    torch.manual_seed(0)
    model = tiny_world_model(reward_loss="mse")
    obs, actions, rewards, ends, mask = random_segment(model)
    losses = model.loss(obs, actions, rewards, ends, mask)
    hidden = model.eval()(interleave(obs, actions)).view(2, 4, model.tokens_per_frame + 1, -1)[:, :, -1]  # (B, T, D)
    torch.testing.assert_close(
        model.loss(obs, actions, rewards, ends, mask)["reward"],
        F.mse_loss(model.head_rewards(hidden).squeeze(-1), rewards),
    )
    assert losses["reward"].requires_grad


def test_world_model_overfits_one_pong_sequence(pong):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer().eval()
    with torch.no_grad():
        obs_tokens = tokenizer.encode(pong.frames[:8]).unsqueeze(0)  # (1, T, K), random but fixed encoder
    model = tiny_world_model(max_timesteps=8, **NO_DROPOUT)
    steps = pong.actions[None, :8], pong.rewards[None, :8], pong.ends[None, :8]
    batch = (obs_tokens, *steps, torch.ones(1, 8, dtype=torch.bool))
    optimizer = model.configure_optimizer(3e-3, (0.9, 0.999))
    for _ in range(250):
        optimizer.zero_grad()
        losses = model.loss(*batch)
        if losses["transition"].item() < 0.05:  # about 100 steps
            break
        losses["total"].backward()
        optimizer.step()
    assert losses["transition"].item() < 0.05
    assert losses["reward"].item() < 0.05 and losses["termination"].item() < 0.05


def imagination_setup(pong: Play, timesteps: int = 3, batch: int = 3, **changes):
    """The tiny E, D and G (L = timesteps), untrained, and `batch` real Pong frames (B, 3, 64, 64) uint8."""
    torch.manual_seed(0)
    return tiny_tokenizer(), tiny_world_model(max_timesteps=timesteps, **changes), pong.frames[:batch]


def test_world_model_imagination_shapes_and_cache_refresh(pong):
    tokenizer, model, frames = imagination_setup(pong)
    model.train()
    wm_env = WorldModelEnv(tokenizer, model)
    x0 = wm_env.reset(frames)
    assert x0.shape == (3, 3, 64, 64) and x0.dtype == torch.float32 and 0 <= x0.min() and x0.max() <= 1
    K = model.tokens_per_frame
    for t in range(3 * model.config.max_timesteps + 1):  # far more steps than fit in L
        rewards, ends, next_frames = wm_env.step(torch.randint(6, (3,)), decode=t % 2 == 0)
        assert rewards.shape == ends.shape == (3,) and rewards.dtype == ends.dtype == torch.float32
        assert set(rewards.tolist()) <= {-1.0, 0.0, 1.0} and set(ends.tolist()) <= {0.0, 1.0}
        assert wm_env.tokens.shape == (3, K) and wm_env.tokens.dtype == torch.int64
        assert wm_env.cache.length <= model.max_tokens and (wm_env.cache.length - K) % (K + 1) == 0
        if t % 2 == 0:
            assert next_frames.shape == (3, 3, 64, 64) and next_frames.dtype == torch.float32
        else:
            assert next_frames is None
    assert model.training and all(m.training for m in model.modules())  # modes restored after imagining
    assert tokenizer.training and all(m.training for m in tokenizer.modules())


def test_world_model_imagination_samples_from_the_full_forward_distribution(pong):
    """Replaying env.step's draws (same RNG stream) with full forward passes over the current context gives the
    same r̂, d̂ and ẑ: the cache and its refresh at full context match the model."""
    tokenizer, model, frames = imagination_setup(pong, timesteps=2, batch=2)
    model.eval()
    K, steps = model.tokens_per_frame, 5
    actions = torch.randint(6, (steps, 2))
    wm_env = WorldModelEnv(tokenizer, model)
    wm_env.reset(frames)
    torch.manual_seed(1)
    imagined = [wm_env.step(a, decode=False)[:2] + (wm_env.tokens,) for a in actions]

    torch.manual_seed(1)
    with torch.no_grad():
        current = tokenizer.encode(frames)  # z_0, (B, K)
        context = current
        for action, (rewards, ends, tokens) in zip(actions, imagined):
            if context.size(1) + K + 1 > model.max_tokens:
                context = current  # refresh: start over from the current frame's tokens
            context = torch.cat([context, action[:, None]], dim=1)
            hidden = model(context)[:, -1]
            torch.testing.assert_close(sample(model.head_rewards(hidden)).float() - 1, rewards)
            torch.testing.assert_close(sample(model.head_ends(hidden)).float(), ends)
            for _ in range(K):
                context = torch.cat([context, sample(model.head_observations(hidden))[:, None]], dim=1)
                hidden = model(context)[:, -1]
            current = context[:, -K:]
            torch.testing.assert_close(current, tokens)


def test_world_model_imagination_mse_rewards(pong):
    """reward_loss = "mse": r̂_t is the regression head's output at a_t, not a sampled sign."""
    tokenizer, model, frames = imagination_setup(pong, reward_loss="mse")
    wm_env = WorldModelEnv(tokenizer, model.eval())
    wm_env.reset(frames.float() / 255)  # float frames are accepted too
    actions = torch.tensor([0, 1, 2])
    rewards, ends, next_frames = wm_env.step(actions)
    with torch.no_grad():
        context = torch.cat([tokenizer.encode(frames), actions[:, None]], dim=1)  # z_0, a_0: (B, K + 1)
        expected = model.head_rewards(model(context)[:, -1]).squeeze(-1)  # (B,)
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-6)
    assert next_frames.shape == (3, 3, 64, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_world_model_imagination_step_never_syncs_on_cuda(pong):
    tokenizer, model, frames = imagination_setup(pong)
    tokenizer, model, frames = tokenizer.cuda(), model.cuda(), frames.cuda()
    wm_env = WorldModelEnv(tokenizer, model)
    wm_env.reset(frames)
    actions = torch.zeros(3, dtype=torch.long, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2 * model.config.max_timesteps):
            wm_env.step(actions)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_world_model_paper_parameter_count_and_optimizer_groups():
    model = WorldModel(WorldModelConfig(), vocab_size=512, tokens_per_frame=16, num_actions=6)
    assert model.max_tokens == 340
    assert 8.3e6 < sum(p.numel() for p in model.parameters()) < 8.6e6
    optimizer = model.configure_optimizer(1e-4, (0.9, 0.999))
    decay, no_decay = optimizer.param_groups
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert decay["weight_decay"] == 0.01 and {id(p) for p in decay["params"]} == linear_weights
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------------------------------
# actor_critic.py: learning in imagination (Section 2.3, Appendices A.3 and B)
# ---------------------------------------------------------------------------------------------------------------------

AC = TINY.actor_critic  # conv channels (8, 8, 16, 16), LSTM 64, burn-in 4, H = 4


def tiny_models(num_actions: int) -> tuple[Tokenizer, WorldModel, ActorCritic]:
    """The tiny E and D, G and π/V, untrained."""
    return (
        tiny_tokenizer(),
        tiny_world_model(num_actions=num_actions),
        ActorCritic(AC, num_actions, TINY.env.frame_size),
    )


def _ac_brute_force_lambda_returns(rewards, values, ends, gamma, lam):
    """Λ_t as the λ-weighted average of n-step returns G_t^(n), in plain Python (the expanded form of Eq. (4))."""
    batch_size, horizon = len(rewards), len(rewards[0])
    out = [[0.0] * horizon for _ in range(batch_size)]
    for b in range(batch_size):
        for t in range(horizon):

            def n_step_return(n):  # G_t^(n) = Σ_{k<n} Π_{s<k} γ(1 - d_{t+s}) r_{t+k} + Π_{s<n} γ(1 - d_{t+s}) V_{t+n}
                total, discount = 0.0, 1.0
                for k in range(n):
                    total += discount * rewards[b][t + k]
                    discount *= gamma * (1 - ends[b][t + k])
                return total + discount * values[b][t + n]

            longest = horizon - t
            weighted = sum((1 - lam) * lam ** (n - 1) * n_step_return(n) for n in range(1, longest))
            out[b][t] = weighted + lam ** (longest - 1) * n_step_return(longest)
    return torch.tensor(out, dtype=torch.float64)


def _ac_random_trajectories(batch_size=6, horizon=9, end_prob=0.25, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch_size, horizon, generator=generator, dtype=torch.float64)
    values = torch.randn(batch_size, horizon + 1, generator=generator, dtype=torch.float64)
    ends = (torch.rand(batch_size, horizon, generator=generator) < end_prob).double()
    return rewards, values, ends


@pytest.mark.parametrize("gamma,lam", [(0.995, 0.95), (0.8, 0.6), (0.9, 1.0)])  # λ = 0: the one-step TD test
def test_actor_critic_lambda_returns_match_brute_force(gamma, lam):
    rewards, values, ends = _ac_random_trajectories()
    assert ends.sum() > 0 and ends[:, :-1].sum() > 0  # terminations mid-trajectory included
    expected = _ac_brute_force_lambda_returns(rewards.tolist(), values.tolist(), ends.tolist(), gamma, lam)
    actual = compute_lambda_returns(rewards, values, ends, gamma, lam)
    assert actual.shape == rewards.shape
    torch.testing.assert_close(actual, expected)


def test_actor_critic_lambda_returns_lambda_one_is_discounted_sum():
    rewards, values, _ = _ac_random_trajectories()
    values[:, -1] = 0.0  # V(x̂_H) = 0
    gamma, horizon = 0.9, rewards.size(1)
    returns = compute_lambda_returns(rewards, values, torch.zeros_like(rewards), gamma, lam=1.0)
    for t in range(horizon):
        discounted = sum(gamma ** (k - t) * rewards[:, k] for k in range(t, horizon))
        torch.testing.assert_close(returns[:, t], discounted)


def test_actor_critic_lambda_returns_lambda_zero_is_one_step_td():
    rewards, values, ends = _ac_random_trajectories()
    gamma = 0.9
    returns = compute_lambda_returns(rewards, values, ends, gamma, lam=0.0)
    torch.testing.assert_close(returns, rewards + gamma * (1 - ends) * values[:, 1:])


def test_actor_critic_lambda_returns_hand_example():
    # γ = 0.5, λ = 0.5, H = 2, r̂ = (1, 2), V(x̂_1) = 4, V(x̂_2) = 8 (Eq. (4) does not use V(x̂_0)).
    # Row 0, no end:  Λ_2 = 8; Λ_1 = 2 + 0.5 * (0.5 * 8 + 0.5 * 8) = 6; Λ_0 = 1 + 0.5 * (0.5 * 4 + 0.5 * 6) = 3.5.
    # Row 1, d̂_0 = 1: Λ_1 = 6 as above; Λ_0 = 1 + 0.5 * 0 * (...) = 1.
    rewards = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    values = torch.tensor([[0.0, 4.0, 8.0], [0.0, 4.0, 8.0]])
    ends = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    returns = compute_lambda_returns(rewards, values, ends, gamma=0.5, lam=0.5)
    torch.testing.assert_close(returns, torch.tensor([[3.5, 6.0], [1.0, 6.0]]))


def _ac_imagine_output(logits, values, rewards, ends, actions):
    batch_size, horizon = actions.shape
    return ImagineOutput(actions, logits, values, rewards, ends, torch.zeros(batch_size, horizon + 1, 3, 64, 64))


def test_actor_critic_policy_gradient_matches_reinforce_by_hand():
    # B = H = 1, γ = 0.5: Λ_0 = r̂_0 + γ V(x̂_1) = 1 + 0.5 * 0 = 1, V(x̂_0) = 0.5, advantage Λ_0 - V(x̂_0) = 0.5.
    # π = softmax(0, ln 2, 0) = (1/4, 1/2, 1/4), a_0 = 1.
    # d/dlogits [-log π(a_0) * 0.5] = -(onehot(a_0) - π) * 0.5 = -((0, 1, 0) - (1/4, 1/2, 1/4)) * 0.5
    #                              = (0.125, -0.25, 0.125).
    logits = torch.tensor([[[0.0, math.log(2.0), 0.0]]], requires_grad=True)
    out = _ac_imagine_output(
        logits, torch.tensor([[0.5, 0.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1]])
    )
    losses = actor_critic_loss(out, ActorCriticConfig(gamma=0.5))
    losses["policy"].backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.125, -0.25, 0.125]]]))


def test_actor_critic_entropy_term_pushes_entropy_up():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.0, 3.0]]], requires_grad=True)
    out = _ac_imagine_output(logits, torch.zeros(1, 3), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2).long())
    losses = actor_critic_loss(out, ActorCriticConfig())
    assert losses["entropy"] < 0  # -η H(π)
    losses["entropy"].backward()
    with torch.no_grad():
        stepped = logits - 100.0 * logits.grad

    def entropy(x):
        return torch.distributions.Categorical(logits=x).entropy()

    assert (entropy(stepped) > entropy(logits.detach())).all()


def test_actor_critic_steps_after_imagined_end_have_zero_weight():
    torch.manual_seed(0)
    batch_size, horizon, num_actions = 3, 6, 4
    logits = torch.randn(batch_size, horizon, num_actions, requires_grad=True)
    values = torch.randn(batch_size, horizon + 1, requires_grad=True)
    rewards, ends = torch.randn(batch_size, horizon), torch.zeros(batch_size, horizon)
    ends[0, 2] = 1.0  # row 0 ends at t = 2 (kept), steps 3..5 must teach nothing
    ends[1, 4] = ends[1, 5] = 1.0
    actions = torch.randint(num_actions, (batch_size, horizon))
    out = _ac_imagine_output(logits, values, rewards, ends, actions)
    losses = actor_critic_loss(out, ActorCriticConfig())
    for term in ("value", "policy"):
        logits.grad = values.grad = None
        losses[term].backward(retain_graph=True)
        grad = logits.grad if term == "policy" else values.grad[:, :-1]
        assert (grad[0, 3:] == 0).all() and (grad[1, 5:] == 0).all(), term
        assert grad[0, 2].abs().sum() > 0 and grad[1, 4].abs().sum() > 0 and (grad[2].abs().sum(-1) > 0).all(), term
    # Whatever happens after the end does not change any loss.
    rewards_after, values_after = rewards.clone(), values.detach().clone()
    rewards_after[0, 3:] += 10.0
    values_after[0, 4:] -= 10.0
    changed_out = _ac_imagine_output(logits, values_after, rewards_after, ends, actions)
    changed = actor_critic_loss(changed_out, ActorCriticConfig())
    for key in ("value", "policy", "entropy"):
        torch.testing.assert_close(changed[key], losses[key])


def test_actor_critic_reference_bootstrap_and_train_after_end_follow_the_authors_losses():
    """bootstrap="reference", train_after_end=True: the authors' losses, written here as a plain loop.

    Their recursion: Λ_{H-1} = V_{H-1}; Λ_t = r_t + γ(1 - d_t)[(1 - λ)V_{t+1} + λΛ_{t+1}]; losses on t < H - 1,
    averaged over B(H - 1) steps, with no mask after an imagined end.
    """
    gamma, lam = 0.9, 0.8
    rewards, values, ends = _ac_random_trajectories(batch_size=3, horizon=5, end_prob=0.3, seed=1)
    assert ends[:, :-2].sum() > 0  # ends before the last trained step, so the mask would matter
    batch_size, horizon = rewards.shape
    returns = torch.zeros(batch_size, horizon - 1, dtype=torch.float64)
    for b in range(batch_size):
        last = values[b, horizon - 1].item()
        for t in reversed(range(horizon - 1)):
            keep = 1.0 - ends[b, t].item()
            last = rewards[b, t].item() + gamma * keep * ((1 - lam) * values[b, t + 1].item() + lam * last)
            returns[b, t] = last
    logits = torch.randn(batch_size, horizon, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    actions = torch.randint(4, (batch_size, horizon), generator=torch.Generator().manual_seed(3))
    log_probs = logits.log_softmax(-1).gather(-1, actions[..., None]).squeeze(-1)[:, :-1]  # (B, H - 1)
    expected_value = (values[:, : horizon - 1] - returns).square().mean()
    expected_policy = -(log_probs * (returns - values[:, : horizon - 1])).mean()
    config = ActorCriticConfig(gamma=gamma, lam=lam, bootstrap="reference", train_after_end=True)
    losses = actor_critic_loss(_ac_imagine_output(logits, values, rewards, ends, actions), config)
    torch.testing.assert_close(losses["value"], expected_value)
    torch.testing.assert_close(losses["policy"], expected_policy)
    # The paper's losses on the same numbers: Λ_H = V(x̂_H), all H steps, none after the first imagined end.
    paper = actor_critic_loss(
        _ac_imagine_output(logits, values, rewards, ends, actions), ActorCriticConfig(gamma=gamma, lam=lam)
    )
    paper_returns = _ac_brute_force_lambda_returns(rewards.tolist(), values.tolist(), ends.tolist(), gamma, lam)
    alive = torch.cat([torch.ones(batch_size, 1), 1 - ends[:, :-1]], dim=1).cumprod(1)  # up to the first end
    expected_paper = (alive * (values[:, :horizon] - paper_returns).square()).sum() / (batch_size * horizon)
    torch.testing.assert_close(paper["value"], expected_paper)
    with pytest.raises(ValueError, match="bootstrap must be one of paper, reference"):
        actor_critic_loss(_ac_imagine_output(logits, values, rewards, ends, actions), ActorCriticConfig(bootstrap="x"))


def test_actor_critic_loss_keys_and_backward():
    torch.manual_seed(0)
    out = _ac_imagine_output(
        torch.randn(2, 3, 5, requires_grad=True),
        torch.randn(2, 4, requires_grad=True),
        torch.randn(2, 3),
        torch.zeros(2, 3),
        torch.randint(5, (2, 3)),
    )
    losses = actor_critic_loss(out, ActorCriticConfig())
    assert {"total", "value", "policy", "entropy", "imagined_return", "mean_entropy"} <= losses.keys()
    for key in ("total", "value", "policy", "entropy"):
        assert losses[key].ndim == 0 and losses[key].requires_grad
    torch.testing.assert_close(losses["total"], losses["value"] + losses["policy"] + losses["entropy"])
    assert not losses["imagined_return"].requires_grad
    losses["total"].backward()


def test_actor_critic_burn_in_sets_state_and_skips_padding():
    torch.manual_seed(0)
    model = ActorCritic(AC, num_actions=3, frame_size=TINY.env.frame_size)
    frames = random_frames(2, 6).float() / 255  # x̂, (B, T, 3, 64, 64) in [0, 1]
    mask = torch.ones(2, 4, dtype=torch.bool)
    h, c = model.burn_in(frames[:, 2:], mask)
    assert h.shape == (2, AC.lstm_dim) and not h.requires_grad
    with torch.no_grad():  # the same state, one forward step at a time
        state = model.initial_state(2)
        for t in range(2, 6):
            _, _, state = model(frames[:, t], state)
    torch.testing.assert_close((h, c), state)
    # Padding in front (as the replay buffer pads a segment that starts before its episode) is skipped.
    padded_mask = torch.cat([torch.zeros(2, 2, dtype=torch.bool), mask], dim=1)
    padded_mask[1, 1] = True  # row 1 sees one more real frame
    padded_h, padded_c = model.burn_in(frames, padded_mask)
    torch.testing.assert_close((padded_h[0], padded_c[0]), (h[0], c[0]))
    torch.testing.assert_close((padded_h[1:], padded_c[1:]), model.burn_in(frames[1:, 1:], torch.ones(1, 5).bool()))
    # A fully padded row keeps the initial state.
    empty_h, _ = model.burn_in(frames, torch.zeros(2, 6, dtype=torch.bool))
    assert (empty_h == 0).all()


def test_actor_critic_forward_shapes_mask_and_reset():
    torch.manual_seed(0)
    model = ActorCritic(AC, num_actions=5, frame_size=TINY.env.frame_size)
    frames = random_frames(3, 3).float() / 255
    state = model.burn_in(frames[:, :2], torch.ones(3, 2, dtype=torch.bool))
    with torch.no_grad():
        logits, values, (h, c) = model(frames[:, 2], state, mask=torch.tensor([True, False, True]))
        unmasked_logits, unmasked_values, (unmasked_h, unmasked_c) = model(frames[:, 2], state)
    assert logits.shape == (3, 5) and values.shape == (3,)
    torch.testing.assert_close((h[1], c[1]), (state[0][1], state[1][1]))  # a padded row keeps its state
    torch.testing.assert_close((h[[0, 2]], c[[0, 2]]), (unmasked_h[[0, 2]], unmasked_c[[0, 2]]))  # the others step
    torch.testing.assert_close((logits[[0, 2]], values[[0, 2]]), (unmasked_logits[[0, 2]], unmasked_values[[0, 2]]))
    reset_h, reset_c = model.reset_state((h, c), torch.tensor([False, True, False]))
    assert (reset_h[1] == 0).all() and (reset_c[1] == 0).all()
    torch.testing.assert_close(reset_h[[0, 2]], h[[0, 2]])


def test_actor_critic_parameter_count():
    num_parameters = sum(
        p.numel()
        for p in ActorCritic(ActorCriticConfig(), num_actions=6, frame_size=EnvConfig().frame_size).parameters()
    )
    assert 3_100_000 < num_parameters < 3_300_000, num_parameters  # "about 3.2 million" with the paper's config


def test_actor_critic_act_shapes_temperature_and_epsilon():
    torch.manual_seed(0)
    tokenizer, _, model = tiny_models(num_actions=3)
    frames = random_frames(32)
    state = model.initial_state(32)
    actions, new_state = model.act(frames, state, tokenizer)
    assert actions.shape == (32,) and actions.dtype == torch.int64 and ((0 <= actions) & (actions < 3)).all()
    assert new_state[0].shape == (32, AC.lstm_dim) and not new_state[0].requires_grad
    # Temperature 0 is the argmax of π's logits on x̂ = D(E(x)).
    greedy, _ = model.act(frames, state, tokenizer, temperature=0.0)
    logits, _, _ = model(tokenizer.encode_decode(frames), state)
    torch.testing.assert_close(greedy, logits.argmax(-1))
    # ε = 1: uniformly random actions, whatever π says (P(some action never drawn) = 3 (2/3)^32 < 1e-5).
    random_actions, _ = model.act(frames, state, tokenizer, temperature=0.0, epsilon=1.0)
    assert len(random_actions.unique()) == 3


def test_actor_critic_imagine_rollout():
    torch.manual_seed(0)
    batch_size, horizon, num_actions = 5, AC.imagination_horizon, 4
    tokenizer, world_model, model = tiny_models(num_actions)
    frames = random_frames(batch_size, AC.burn_in + 1)
    mask = torch.ones(batch_size, AC.burn_in + 1, dtype=torch.bool)
    mask[0, :2] = False  # a segment that starts before its episode: padded burn-in frames
    out = imagine(model, WorldModelEnv(tokenizer, world_model), frames, mask, horizon)
    assert out.actions.shape == (batch_size, horizon) and out.actions.dtype == torch.int64
    assert out.logits.shape == (batch_size, horizon, num_actions) and out.logits.requires_grad
    assert out.values.shape == (batch_size, horizon + 1) and out.values.requires_grad
    assert out.rewards.shape == out.ends.shape == (batch_size, horizon)
    assert out.rewards.dtype == out.ends.dtype == torch.float32
    assert set(out.rewards.unique().tolist()) <= {-1.0, 0.0, 1.0} and set(out.ends.unique().tolist()) <= {0.0, 1.0}
    assert out.frames.shape == (batch_size, horizon + 1, 3, 64, 64) and not out.frames.requires_grad
    assert 0 <= out.frames.min() and out.frames.max() <= 1
    torch.testing.assert_close(out.frames[:, 0], tokenizer.encode_decode(frames[:, -1]))  # x̂_0 = D(E(x_0))
    with torch.no_grad():  # π and V saw x̂_0..x̂_H in order, after the burn-in on x̂ = D(E(x)) of the real frames
        state = model.burn_in(tokenizer.encode_decode(frames[:, :-1]), mask[:, :-1])
        for t in range(horizon + 1):
            logits, values, state = model(out.frames[:, t], state)
            torch.testing.assert_close(values, out.values[:, t].detach())
            if t < horizon:
                torch.testing.assert_close(logits, out.logits[:, t].detach())
    losses = actor_critic_loss(out, AC)
    losses["total"].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in (*tokenizer.parameters(), *world_model.parameters()))


def test_actor_critic_imagine_skips_padded_burn_in():
    # Fully padded burn-in frames leave the LSTM at its initial state: same rollout as with no burn-in at all.
    tokenizer, world_model, model = tiny_models(num_actions=3)
    frames = random_frames(2, AC.burn_in + 1)
    mask = torch.zeros(2, AC.burn_in + 1, dtype=torch.bool)
    mask[:, -1] = True
    outputs = []
    for start in (0, AC.burn_in):
        torch.manual_seed(1)
        outputs.append(imagine(model, WorldModelEnv(tokenizer, world_model), frames[:, start:], mask[:, start:], 3))
    for name in ("actions", "logits", "values", "rewards", "ends", "frames"):
        torch.testing.assert_close(getattr(outputs[0], name), getattr(outputs[1], name))


# ---------------------------------------------------------------------------------------------------------------------
# evaluate.py: the evaluation protocol and aggregate metrics (Section 3.2)
# ---------------------------------------------------------------------------------------------------------------------


def _evaluate_iris_hns() -> dict[str, np.ndarray]:
    scores = evaluate.load_reference_scores()
    return {game: evaluate.human_normalized(runs, game, scores)[0] for game, runs in scores["iris"].items()}


def test_evaluate_other_definitions_do_not_reproduce_paper():
    """Why the definitions are what they are: the alternatives miss the paper's median, IQM and gap."""
    hns = _evaluate_iris_hns()
    pooled = np.concatenate(list(hns.values()))
    game_means = np.array([runs.mean() for runs in hns.values()])
    assert round(float(np.mean(pooled)), 3) == 1.046  # the mean is the same either way
    assert round(float(np.median(pooled)), 3) == 0.284  # median pooled: the paper's 0.289 is of per-game means
    assert round(float(evaluate.interquartile_mean(game_means)), 3) == 0.543  # IQM of game means: 0.501 is pooled
    assert round(float(np.maximum(0, 1 - game_means).mean()), 3) == 0.482  # gap of game means: 0.512 is pooled


def test_evaluate_paper_table1_per_game_iris_scores():
    """The shipped per-run scores average to Table 1's IRIS column (a few games checked)."""
    iris = evaluate.load_reference_scores()["iris"]
    table1 = {"Alien": 420.0, "Breakout": 83.7, "Pong": 14.6, "KungFuMaster": 21759.8, "UpNDown": 3546.2}
    for game, score in table1.items():
        assert round(float(np.mean(iris[game])), 1) == score


def test_evaluate_iqm_hand_example():
    # n = 8: drop 2 at each end, mean of 3, 4, 5, 6.
    assert evaluate.interquartile_mean(np.array([8, 1, 7, 2, 6, 3, 5, 4])) == pytest.approx(4.5)
    # n = 10: drop floor(2.5) = 2 at each end, mean of 2..7; an outlier does not move it.
    assert evaluate.interquartile_mean(np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 1000])) == pytest.approx(4.5)
    # n = 3: nothing dropped.
    assert evaluate.interquartile_mean(np.array([1.0, 2.0, 6.0])) == pytest.approx(3.0)
    # Along an axis, as the bootstrap uses it.
    rows = np.array([[8, 1, 7, 2, 6, 3, 5, 4], [1, 1, 1, 1, 9, 9, 9, 9]])
    np.testing.assert_allclose(evaluate.interquartile_mean(rows, axis=-1), [4.5, 5.0])


def test_evaluate_metrics_hand_example():
    hns = {"a": [0.0, 1.0], "b": [2.0, 4.0], "c": [0.5, 0.5]}  # game means 0.5, 3.0, 0.5
    metrics = evaluate.aggregate_metrics(hns)
    assert metrics["mean"] == pytest.approx(4.0 / 3)
    assert metrics["median"] == pytest.approx(0.5)
    assert metrics["iqm"] == pytest.approx(1.0)  # pooled 0, .5, .5, 1, 2, 4: drop one at each end, mean of 4
    assert metrics["optimality_gap"] == pytest.approx((0.5 + 0.0 + 0.5) / 3)  # mean of max(0, 1 - hns)
    assert metrics["superhuman"] == 1


def test_evaluate_bootstrap_ci_contains_point_and_narrows():
    rng = np.random.default_rng(0)
    centers = {f"game{g}": g / 4 for g in range(6)}

    def sample(runs):
        return {game: center + 0.5 * rng.standard_normal(runs) for game, center in centers.items()}

    widths = {}
    for runs in (5, 100):
        hns = sample(runs)
        point = evaluate.aggregate_metrics(hns)
        cis = evaluate.stratified_bootstrap_ci(hns, np.random.default_rng(1), reps=2000)
        for name in evaluate.METRICS:
            low, high = cis[name]
            assert low <= point[name] <= high, (runs, name)
        widths[runs] = {name: cis[name][1] - cis[name][0] for name in evaluate.METRICS}
    for name in evaluate.METRICS:
        assert widths[100][name] < widths[5][name] / 2, name


def test_evaluate_bootstrap_is_seeded_and_stratified():
    hns = {"a": [0.1, 0.2, 0.9], "b": [1.0]}
    first = evaluate.stratified_bootstrap_ci(hns, np.random.default_rng(3), reps=500)
    again = evaluate.stratified_bootstrap_ci(hns, np.random.default_rng(3), reps=500)
    assert first == again
    # Game b has one run: every replicate keeps it, so the mean's CI spans only a's resampling, shifted by b.
    low, high = first["mean"]
    assert (0.1 + 1.0) / 2 <= low <= high <= (0.9 + 1.0) / 2


def test_evaluate_summary_and_missing_reference_scores():
    config = evaluate.EvalConfig(bootstrap_reps=500)
    pong = evaluate.summarize_returns("Pong", [-21.0, -19.0], config, temperature=0.5)
    assert pong["mean_return"] == -20.0 and pong["return_ci"][0] <= -20.0 <= pong["return_ci"][1]
    assert pong["hns"] == pytest.approx((-20.0 + 20.7) / (14.6 + 20.7))
    assert pong["hns_ci"][0] <= pong["hns"] <= pong["hns_ci"][1]
    tennis = evaluate.summarize_returns("Tennis", [-5.0, -3.0], config, temperature=0.5)
    assert tennis["mean_return"] == -4.0 and tennis["hns"] is None
    assert "Tennis" in tennis["hns_note"] and "Random/Human" in tennis["hns_note"]
    assert "none (no Random/Human score for Tennis" in evaluate.format_result(tennis)


def test_agent_checkpoint_validator_refuses_other_game_run_or_file(tmp_path):
    checkpoint = {"config": {"game": "Breakout", "seed": 0, "device": "cuda"}, "game": "Breakout", "num_actions": 4}
    source = tmp_path / "checkpoint.pt"
    agent_lib.check_checkpoint(checkpoint, source, game="Breakout", num_actions=4)
    with pytest.raises(agent_lib.CheckpointError, match="trained on Breakout, not Pong"):
        agent_lib.check_checkpoint(checkpoint, source, game="Pong")
    with pytest.raises(agent_lib.CheckpointError, match="differs from .*config.json in seed"):
        agent_lib.check_checkpoint(checkpoint, source, run_config={"game": "Breakout", "seed": 1})
    # The device may change on resume; it is not a different run.
    agent_lib.check_checkpoint(checkpoint, source, run_config={"game": "Breakout", "seed": 0, "device": "cpu"})
    with pytest.raises(agent_lib.CheckpointError, match="4 actions but Breakout's action set has 6"):
        agent_lib.check_checkpoint(checkpoint, source, num_actions=6)
    torch.save({"agent": {}}, source)
    with pytest.raises(agent_lib.CheckpointError, match="not an iris checkpoint .*lacks config, game, num_actions"):
        agent_lib.load_checkpoint(source)


def _evaluate_write_eval(run_dir: Path, game: str, mean_return: float, name: str = "final_eval.json") -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / name).write_text(json.dumps({"game": game, "returns": [mean_return - 1, mean_return + 1]}))
    return run_dir


def test_evaluate_aggregate_cli(tmp_path, capsys):
    runs = [_evaluate_write_eval(tmp_path / f"pong{s}", "Pong", -20.0 + 10 * s) for s in range(3)]
    runs += [_evaluate_write_eval(tmp_path / f"breakout{s}", "Breakout", 10.0 + s) for s in range(2)]
    runs += [_evaluate_write_eval(tmp_path / "tennis", "Tennis", -10.0)]
    out = tmp_path / "aggregate.json"
    assert run_main(evaluate.main, "--aggregate", *map(str, runs), "--reps", "1000", "--out", str(out)) is None
    stdout = capsys.readouterr().out
    assert "IRIS (paper)" in stdout and "IQM (↑)" in stdout
    assert "Tennis: no Random/Human score" in stdout
    result = json.loads(out.read_text())
    assert result["games"]["Pong"]["returns_per_run"] == [-20.0, -10.0, 0.0]
    assert result["games"]["Pong"]["iris_paper"] == pytest.approx(14.6)
    assert result["games"]["Tennis"]["hns_per_run"] is None and "Tennis" in result["excluded"]
    hns = {"Pong": [(r + 20.7) / 35.3 for r in (-20.0, -10.0, 0.0)], "Breakout": [(r - 1.7) / 28.8 for r in (10, 11)]}
    expected = evaluate.aggregate_metrics(hns)
    for name in evaluate.METRICS:
        value, (low, high) = result["metrics"][name]["value"], result["metrics"][name]["ci"]
        assert value == pytest.approx(expected[name]) and low <= value <= high
    # The paper's IRIS aggregates on the same two games, for comparison.
    iris = evaluate.load_reference_scores()["iris"]
    paper = evaluate.aggregate_metrics({g: evaluate.human_normalized(iris[g], g)[0] for g in ("Pong", "Breakout")})
    assert result["iris_paper_metrics"]["iqm"] == pytest.approx(paper["iqm"])


def test_evaluate_aggregate_bad_run_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    message = run_main(evaluate.main, "--aggregate", str(tmp_path / "empty"))
    assert "empty: no final_eval.json; train.py writes it when the run ends" in message


# --- end to end, with a tiny untrained agent (needs train.py, env.py and ALE) -----------------------------------


@pytest.fixture(scope="module")
def evaluate_tiny_pong_run(tmp_path_factory):
    """A run directory as train.py leaves it: config.json and checkpoint.pt of a tiny, untrained Pong agent."""
    config = tiny_config()
    run_dir = tmp_path_factory.mktemp("evaluate_run")
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    agent_lib.Agent(config, num_actions=6, device="cpu").save(run_dir / "checkpoint.pt", epoch=0, env_steps=0)
    return run_dir


def test_evaluate_end_to_end_pong(evaluate_tiny_pong_run):
    """The command line's smoke test: two test episodes, capped by the run's config at 400 frames (100 steps)."""
    proc = run_script(
        "evaluate.py", str(evaluate_tiny_pong_run), "--episodes", "2", "--envs", "2", "--reps", "500", "--record"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((evaluate_tiny_pong_run / "eval.json").read_text())
    assert result["game"] == "Pong" and result["episodes"] == 2 and len(result["returns"]) == 2
    assert all(-21 <= r <= 21 for r in result["returns"])
    assert result["mean_return"] == pytest.approx(np.mean(result["returns"]))
    assert result["hns"] == pytest.approx((result["mean_return"] + 20.7) / 35.3)
    assert result["temperature"] == 0.5 and result["max_frames"] == 400
    assert "human-normalised score" in proc.stdout
    assert result["video_return"] == max(result["returns"])
    # One GIF frame per step of the best episode, real frame | agent's view, x2: 100 steps of 4 frames, less the 1 to
    # 30 no-op frames of the test env's start.
    shapes = video_shapes(Path(result["video"]))
    assert 93 <= len(shapes) <= 100 and set(shapes) == {(64 * 2, 2 * 64 * 2, 3)}


def test_evaluate_record_mp4_decodes_to_every_frame(tmp_path):
    """--record-format mp4: the real frame beside x̂ = D(E(x)), one video frame per step, through OpenCV."""
    frames = list(random_frames(5).permute(0, 2, 3, 1).numpy())  # 5 frames (64, 64, 3) uint8
    config = evaluate.EvalConfig(record_format="mp4")
    path = evaluate.save_video(frames, tiny_tokenizer().eval(), tmp_path / "best_episode.mp4", config)
    assert video_shapes(path) == [(64 * config.record_scale, 128 * config.record_scale, 3)] * 5


def test_evaluate_end_to_end_refuses_other_game_and_run(evaluate_tiny_pong_run, tmp_path):
    message = run_main(evaluate.main, str(evaluate_tiny_pong_run), "--game", "Breakout", "--episodes", "1")
    assert "trained on Pong, not Breakout" in message
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes((evaluate_tiny_pong_run / "checkpoint.pt").read_bytes())
    config = json.loads((evaluate_tiny_pong_run / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "seed": 7}))
    with pytest.raises(evaluate.EvaluationError, match="belongs to another run"):
        evaluate.load_agent(other, None, "cpu")
    # Weights of another config: the stored config says 128 codes, the weights have 64.
    checkpoint = torch.load(evaluate_tiny_pong_run / "checkpoint.pt", weights_only=False)
    checkpoint["config"]["tokenizer"]["vocab_size"] = 128
    torch.save(checkpoint, tmp_path / "mismatch.pt")
    with pytest.raises(evaluate.EvaluationError, match="weights do not match its config"):
        evaluate.load_agent(tmp_path / "mismatch.pt", None, "cpu")
    checkpoint = torch.load(evaluate_tiny_pong_run / "checkpoint.pt", weights_only=False)
    torch.save({**checkpoint, "num_actions": 18}, tmp_path / "full_action_set.pt")
    with pytest.raises(evaluate.EvaluationError, match="18 actions but Pong.s action set has 6"):
        evaluate.load_agent(tmp_path / "full_action_set.pt", None, "cpu")
    with pytest.raises(evaluate.EvaluationError, match="no checkpoint"):
        evaluate.load_agent(tmp_path / "missing", None, "cpu")
    agent, _, game = evaluate.load_agent(evaluate_tiny_pong_run / "checkpoint.pt", "PongNoFrameskip-v4", "cpu")
    assert game == "Pong" and agent.num_actions == 6


def test_evaluate_aggregate_cli_reproduces_paper(tmp_path, capsys):
    """IRIS's 5 runs x 26 games, as 130 run directories: the CLI prints Table 1's IRIS column (Section 3.2), 1.046,
    0.289, 0.501, 0.512 and 10 superhuman games."""
    paths = []
    for game, runs in evaluate.load_reference_scores()["iris"].items():
        for seed, score in enumerate(runs):
            run_dir = tmp_path / f"{game}-{seed}"
            run_dir.mkdir()
            (run_dir / "final_eval.json").write_text(json.dumps({"game": game, "mean_return": score}))
            paths.append(str(run_dir))
    assert len(paths) == 130
    out = tmp_path / "aggregate.json"
    assert run_main(evaluate.main, "--aggregate", *paths, "--out", str(out)) is None
    metrics = json.loads(out.read_text())["metrics"]
    paper = {"mean": 1.046, "median": 0.289, "iqm": 0.501, "optimality_gap": 0.512}
    assert {name: round(metrics[name]["value"], 3) for name in paper} == paper
    assert metrics["superhuman"]["value"] == 10
    assert "IQM (↑)                0.000     1.000         0.501      0.501" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# train.py: Algorithm 1 end to end (Appendix D), run directory, checkpoints, resume
# ---------------------------------------------------------------------------------------------------------------------


def _train_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_train_config_defaults_equal_the_paper():
    c = agent_lib.IRISConfig()
    # Table 2 (encoder / decoder) and Table 3 (embedding table)
    assert c.tokenizer.resolution == 64 and c.tokenizer.ch == 64 and c.tokenizer.num_res_blocks == 2
    assert len(c.tokenizer.ch_mult) - 1 == 4 and c.tokenizer.attn_resolutions == (8, 16)
    assert (c.tokenizer.vocab_size, c.tokenizer.tokens_per_frame, c.tokenizer.embed_dim) == (512, 16, 512)
    assert c.tokenizer.perceptual_weight == 1.0  # equally weighted terms, Appendix A.1
    # Table 4 (Transformer)
    w = c.world_model
    assert (w.max_timesteps, w.embed_dim, w.num_layers, w.num_heads, w.weight_decay) == (20, 256, 10, 4, 0.01)
    assert (w.embed_dropout, w.attn_dropout, w.resid_dropout) == (0.1, 0.1, 0.1)
    # Table 5 (training loop and shared hyperparameters)
    assert (c.epochs, c.collection_epochs, c.env_steps_per_epoch, c.training_steps_per_epoch) == (600, 500, 200, 200)
    assert (c.collect_epsilon, c.eval_temperature) == (0.01, 0.5)
    assert (c.start_tokenizer_after_epochs, c.start_world_model_after_epochs, c.start_actor_critic_after_epochs) == (
        5,
        25,
        50,
    )
    assert (c.tokenizer_batch_size, c.world_model_batch_size, c.actor_critic_batch_size) == (256, 64, 64)
    assert (c.learning_rate, c.adam_beta1, c.adam_beta2, c.max_grad_norm) == (1e-4, 0.9, 0.999, 10.0)
    # Table 6 (RL) and Appendix A.3 (actor-critic)
    a = c.actor_critic
    assert (a.imagination_horizon, a.gamma, a.lam, a.entropy_weight) == (20, 0.995, 0.95, 0.001)
    assert (a.conv_channels, a.lstm_dim, a.burn_in) == ((32, 32, 64, 64), 512, 20)
    # Section 3.2: 100 final evaluation episodes; the Atari 100k protocol
    assert c.final_eval_episodes == 100 and c.env.frame_skip == 4 and c.env.max_test_frames == 108_000
    assert (c.epochs - (c.epochs - c.collection_epochs)) * c.env_steps_per_epoch == 100_000  # Atari 100k


def test_train_cli_sets_any_field_and_rejects_bad_input():
    config, _ = train.parse_args(["--preset", "tiny", "--tokenizer.vocab_size", "32"])
    assert config.tokenizer.vocab_size == 32 and config.world_model.num_layers == 2  # flag over preset
    config, _ = train.parse_args(["--actor_critic.conv_channels", "4,4,8,8", "--collect_epsilon", "0.1"])
    assert config.actor_critic.conv_channels == (4, 4, 8, 8) and config.collect_epsilon == 0.1
    assert config.actor_critic.gamma == 0.995  # untouched fields keep the paper's values
    with pytest.raises(SystemExit):
        train.parse_args(["--no_such_field", "1"])
    with pytest.raises(SystemExit):
        train.parse_args(["--epochs", "many"])
    message = run_main(train.main, "--game", "Pongg", "--preset", "tiny", "--out", "/nonexistent/never")
    assert "closest valid games: Pong," in message
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            agent_lib.pick_device("cuda")


def test_train_help_shows_each_fields_comment(capsys):
    """`python train.py --help`: a short usage line, and each field's flag with its comment (the paper's name, its
    table) and its default, as the config dataclasses write them."""
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(" [--resume RUN_DIR] [--overwrite] [--preset NAME] [--FIELD VALUE ...]")
    text = " ".join(out.split())  # argparse wraps the help lines
    for line in (
        "--actor_critic.gamma float γ, Table 6 (default 0.995)",
        "--tokenizer.vocab_size int N, Table 3 (default 512)",
        "--world_model.num_layers int M, Table 4 (default 10)",
        "--collection_epochs int # Collection epochs (default 500)",
        '--out str run directory; empty: runs/<game>-<time> (default "")',
        "--actor_critic.conv_channels tuple one 3x3 conv + 2x2 max-pool per entry, Appendix A.3 (default 32,32,64,64)",
    ):
        assert line in text, line
    for name, default in agent_lib.flat_fields(agent_lib.IRISConfig()).items():  # every field has its comment
        assert re.search(rf"--{re.escape(name)} {type(default).__name__} (?!\(default )\S", text), name


@pytest.fixture(scope="session")
def train_tiny_run(tmp_path_factory) -> tuple[Path, str]:
    """The command line's smoke test: a complete run of the tests' tiny config on real Pong, long enough for all three
    phases (delays 1, 3, 5); (run directory, what train.py printed). Tests that only read a finished run read this."""

    def build(folder: Path) -> None:
        proc = run_script("train.py", *TINY_FLAGS, "--epochs", "6", "--out", str(folder / "run"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (folder / "stdout.txt").write_text(proc.stdout)

    folder = built_once(tmp_path_factory, "train_tiny_run", build)
    return folder / "run", (folder / "stdout.txt").read_text()


def test_learn_curve_reads_a_runs_evaluations_and_plays_a_random_policy_under_its_protocol(
    train_tiny_run, tmp_path, capsys
):
    """learn.py curve: each evaluation of the run (from its checkpoint's history) and its final one, at their env
    steps, beside a random policy played under the run's own test protocol (its env config); a PNG."""
    import learn

    run_dir, _ = train_tiny_run
    learn.main(["curve", "--runs", str(run_dir), "--out", str(tmp_path), "--random_episodes", "2"])
    printed = capsys.readouterr().out
    history = torch.load(run_dir / "checkpoint.pt", weights_only=False)["history"]
    evaluation = next(row for row in history if "eval/returns" in row)  # epoch 5 of the tiny preset
    assert f"run | env steps {int(evaluation['env_steps']):>7} | return {evaluation['eval/return']:8.2f}" in printed
    final = json.loads((run_dir / "final_eval.json").read_text())
    assert f"run | final evaluation at env steps {final['env_steps']} | return {final['mean_return']:8.2f}" in printed
    (cached,) = tmp_path.glob("random_Pong_2_400.json")  # the run's max_test_frames, 400, not the default 108,000
    random_mean = np.mean(json.loads(cached.read_text())["returns"])
    assert random_mean > -10  # 100 agent steps of Pong: a few points lost, not a whole game's 21
    assert f"random policy | Pong | return {random_mean:8.2f}" in printed
    assert (tmp_path / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_learn_baselines_plays_each_action_held_constant_on_a_real_game(tmp_path, capsys):
    import learn

    # RoadRunner's first 125 steps: the road runner earns points only by running left, to the seeds.
    args = ["--games", "RoadRunner", "--max_test_frames", "500", "--constant_episodes", "1", "--random_episodes", "1"]
    learn.main(["baselines", *args, "--out", str(tmp_path)])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("RoadRunner | ")]
    returns = {row[1].strip(): float(row[2].split()[0]) for row in rows}
    assert len(returns) == 1 + 18 and returns["always NOOP"] == returns["always RIGHT"] == 0.0
    assert returns["always LEFT"] >= 100 and returns["always UPLEFT"] >= 100  # one seed: 100 points


def test_learn_run_world_model_holds_out_the_runs_last_steps(train_tiny_run, tmp_path, capsys):
    """learn.py run_world_model: a fresh G of the run's config on the run's first steps, scored on its last
    --heldout_steps; the copy baseline is that of the held-out tiles alone, worked out here from the frames."""
    import learn

    run_dir, _ = train_tiny_run
    args = ["--runs", str(run_dir), "--out", str(tmp_path), "--steps", "2", "--eval_every", "1", "--heldout_steps"]
    learn.main(["run_world_model", *args, "100"])
    rows = list(csv.DictReader((tmp_path / "run_world_model_metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    agent = agent_lib.Agent.load(run_dir / "checkpoint.pt", device="cpu").eval()
    replay = ReplayBuffer.load(run_dir / "replay")  # 300 steps in 6 epochs of 50, no episode end
    L = agent.config.world_model.max_timesteps
    assert len(replay) == 300 and not replay._data["ends"][:300].any()
    with torch.no_grad():
        z = agent.tokenizer.encode(replay.observations[200:])  # (100, K): the held-out steps
    tiles = z[100 % L :].view(-1, L, z.size(1))  # tiled backwards from the last step: whole segments only
    copy = (tiles[:, 1:] == tiles[:, :-1]).float().mean().item()
    assert float(rows[0]["copy_acc"]) == pytest.approx(copy, abs=1e-4)
    assert "the run's own G, on the held-out segments: token_acc " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot give --heldout_steps 300 held out"):
        learn.main(["run_world_model", *args, "300"])


def test_learn_run_tokenizer_trains_on_the_runs_first_steps_with_its_batch_and_lr(train_tiny_run, tmp_path, capsys):
    """learn.py run_tokenizer: a fresh E, D of the run's config at the run's batch (16) and learning rate (1e-3);
    held out: the last --heldout_steps frames, against the median of the others (worked out here)."""
    import learn

    run_dir, _ = train_tiny_run
    args = ["--runs", str(run_dir), "--out", str(tmp_path), "--steps", "2", "--eval_every", "1", "--heldout_steps"]
    learn.main(["run_tokenizer", *args, "100"])
    printed = capsys.readouterr().out
    assert "batch 16, lr 0.001" in printed and "the run's own E, on the held-out frames: l1 " in printed
    with PIL.Image.open(tmp_path / "run_tokenizer_own.png") as picture:  # 8 held-out frames above the run's D(E(x))
        assert picture.size == (8 * 64 * learn.PICTURE_SCALE, 2 * 64 * learn.PICTURE_SCALE)
    rows = list(csv.DictReader((tmp_path / "run_tokenizer_metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    frames = ReplayBuffer.load(run_dir / "replay").observations.float() / 255  # (300, 3, 64, 64)
    x, median = frames[200:], frames[:200].median(dim=0).values  # held out; the training frames' median
    error = (x - median).abs()
    foreground = (error.amax(dim=1, keepdim=True) > 0.1).expand_as(x)
    assert float(rows[0]["fg_l1_median"]) == pytest.approx(error[foreground].mean().item(), abs=1e-4)
    assert 1 <= int(rows[-1]["distinct_frames"]) <= 100


def test_learn_collects_its_data_once(tmp_path, monkeypatch, capsys):
    """learn.py's data sets are collected on the first call and read back on the next (a ReplayBuffer is a folder)."""
    import learn

    monkeypatch.setattr(learn, "TRAIN_STEPS", 30)  # sizes only: the collection itself is the real one, on Pong
    monkeypatch.setattr(learn, "HELDOUT_STEPS", 20)
    first = learn.load_data(tmp_path, "Pong", seed=0)
    assert capsys.readouterr().out.count("collected") == 2
    second = learn.load_data(tmp_path, "Pong", seed=0)
    assert "collected" not in capsys.readouterr().out
    assert [len(b) for b in second] == [30, 20] and torch.equal(first[0].observations, second[0].observations)


def test_learn_kmeans_codebook_puts_each_code_at_the_mean_of_its_encoder_outputs():
    """--continuous_steps' switch to tokens: the codebook becomes Lloyd's fixed point on E's outputs y^k (each code
    the mean of the y^k nearest to it), which quantises them closer than the random picks k-means starts from."""
    import learn

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(perceptual_weight=0.0, vocab_size=8)
    frames = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        y = tokenizer.eval()._encode_continuous(tokenizer._preprocess(frames))
    y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])  # (16 * K, d)
    picked = y[torch.randperm(len(y))[:8]]  # random picks, as k-means starts from
    torch.manual_seed(0)
    learn.kmeans_codebook(tokenizer, frames)
    codes = tokenizer.embedding.weight.detach()  # (8, d)
    nearest = torch.cdist(y, codes).argmin(dim=1)
    for i in nearest.unique():
        assert torch.allclose(codes[i], y[nearest == i].mean(dim=0), atol=1e-5)
    assert torch.cdist(y, codes).amin(dim=1).mean() < torch.cdist(y, picked).amin(dim=1).mean()


def test_learn_foreground_weights_and_ball_measures_on_a_drawn_pong_frame():
    """--foreground_weight w: 1 + w on the pixels that differ from the median frame (ball, paddle, score), 1 elsewhere.
    The ball's measures look only inside Pong's field (not at the paddle or score): the median frame (no ball) has
    the ball's own contrast as L1 and draws it in no frame; x itself draws it in every frame with a ball."""
    import learn

    median = torch.tensor([0.56, 0.28, 0.07]).view(3, 1, 1).expand(3, 64, 64)  # Pong's brown
    x = median.repeat(3, 1, 1, 1)  # (3, 3, 64, 64): frame 2 has no ball
    white = torch.tensor([0.93, 0.93, 0.93])
    x[0, :, 30, 40] = x[1, :, 20, 12] = white  # the balls
    x[:2, :, 30, 57] = torch.tensor([0.36, 0.73, 0.36]).view(1, 3)  # the agent's paddle (green), outside the field
    x[:, :, 2, 15] = white  # a score digit, outside the field
    frames = (x * 255).round().to(torch.uint8)
    weights = learn.pixel_weights(frames, median, 20.0)  # (3, 1, 64, 64)
    foreground = torch.zeros(3, 1, 64, 64, dtype=torch.bool)
    foreground[0, 0, 30, 40] = foreground[1, 0, 20, 12] = True
    foreground[:2, 0, 30, 57] = foreground[:, 0, 2, 15] = True
    assert torch.equal(weights, 1 + 20 * foreground.float()) and learn.pixel_weights(frames, median, 0.0) is None
    pong = learn.BALL_REGIONS["Pong"]
    contrast = (white - median[:, 0, 0]).abs().mean().item()  # 0.54
    background = median.expand_as(x)
    assert learn.ball_metrics(x, background, median, pong) == pytest.approx(
        {"ball_l1": contrast, "ball_l1_median": contrast, "ball_drawn": 0.0}, rel=1e-5
    )
    assert learn.ball_metrics(x, x, median, pong) == {
        "ball_l1": 0.0,
        "ball_l1_median": pytest.approx(contrast),
        "ball_drawn": 1.0,
    }
    no_second_ball = x.clone()
    no_second_ball[1, :, 20, 12] = median[:, 0, 0]  # drawn in frame 0 only; frame 2 (no ball) does not count
    assert learn.ball_metrics(x, no_second_ball, median, pong)["ball_drawn"] == 0.5
    assert all(math.isnan(v) for v in learn.ball_metrics(x, x, median, None).values())  # a game without a region


def test_learn_dream_ball_table_measures_a_moving_ball_against_a_frozen_one(tmp_path):
    """The ball's position is the contrast-weighted centroid of Pong's field (the paddle outside it is not the ball);
    a dream that moves the ball as the real game is at distance 0, one that freezes it at the frozen distance."""
    import learn

    median = torch.tensor([0.56, 0.28, 0.07]).view(3, 1, 1).expand(3, 64, 64)
    real = median.repeat(2, 12, 1, 1, 1)  # (B=2, T+1=12, 3, 64, 64)
    for t in range(12):
        real[:, t, :, 30, 20 + t] = 0.93  # the ball moves right, 1 pixel per step
        real[:, t, :, 40, 57] = 0.9  # the paddle, outside the field
    real[1, :, :, 31, :] = real[1, :, :, 30, :]  # the second ball is two pixels tall
    pong = learn.BALL_REGIONS["Pong"]
    positions = learn.ball_positions(real, median, pong)  # (2, 12, 2)
    assert torch.allclose(positions[0, 3], torch.tensor([30.0, 23.0])) and torch.allclose(
        positions[1, 3], torch.tensor([30.5, 23.0])
    )
    assert learn.ball_positions(median, median, pong).isnan().all()  # no ball
    frozen = real[:, :1].expand_as(real)
    for dreamed, distance in ((real, 0.0), (frozen, sum(range(1, 11)) / 10)):  # steps 1-10: 1, ..., 10 pixels
        learn.dream_ball_table(real, dreamed, median, pong, tmp_path / "ball.csv")
        rows = list(csv.DictReader((tmp_path / "ball.csv").open()))
        assert [r["steps"] for r in rows] == ["1-10", "11-11"] and rows[0]["real_balls"] == "20"
        assert float(rows[0]["drawn"]) == 1.0 and float(rows[0]["frozen_distance"]) == pytest.approx(5.5)
        assert float(rows[0]["distance"]) == pytest.approx(distance)
        mean = torch.tensor([30.25, 25.5])  # of both balls over the 12 steps
        to_mean = sum((positions[b, t] - mean).norm() for b in range(2) for t in range(1, 11)) / 20
        assert float(rows[0]["mean_distance"]) == pytest.approx(to_mean.item(), rel=1e-5)


def test_learn_continuous_trains_e_and_d_without_the_codebook(train_tiny_run, tmp_path):
    """learn.py --continuous_steps: D(E(x)) with E's output y straight into D (worked out here from the layers); the
    loss is the reconstruction term alone, so the codebook gets no gradient; no codes are counted until the switch."""
    import learn

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(perceptual_weight=0.0)
    frames = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    x = frames.float() / 255 * 2 - 1
    by_hand = tokenizer.decoder(tokenizer.post_quant_conv(tokenizer.pre_quant_conv(tokenizer.encoder(x))))
    loss = learn.continuous_losses(tokenizer, frames)["total"]
    assert loss.item() == pytest.approx((x - by_hand).abs().mean().item(), rel=1e-5)  # TINY: L1
    loss.backward()
    assert tokenizer.embedding.weight.grad is None and tokenizer.encoder[0].weight.grad is not None
    tokens, images = learn.reconstruct(tokenizer, frames, continuous=True)
    assert tokens is None and torch.allclose(images, ((by_hand + 1) / 2).clamp(0, 1), atol=1e-5)
    run_dir, _ = train_tiny_run
    args = ["--runs", str(run_dir), "--out", str(tmp_path), "--steps", "2", "--heldout_steps", "100"]
    learn.main(["run_tokenizer", *args, "--eval_every", "1", "--continuous_steps", "1"])
    rows = list(csv.DictReader((tmp_path / "run_tokenizer_metrics.csv").open()))
    assert rows[0]["codes_used"] == "nan" and int(rows[1]["codes_used"]) > 0  # tokens from step 1, k-means codes
    assert len({r["lr"] for r in rows}) == 1  # the run's own learning rate, constant without --min_lr
    learn.main(["run_tokenizer", *args, "--eval_every", "1", "--continuous_steps", "1", "--foreground_weight", "20"])
    weighted = list(csv.DictReader((tmp_path / "run_tokenizer_metrics.csv").open()))
    assert float(weighted[1]["loss"]) > float(rows[1]["loss"])  # the same first batch, its foreground counted 21x
    learn.main(["run_tokenizer", *args, "--eval_every", "1", "--steps", "3", "--lr", "1e-3", "--min_lr", "1e-4"])
    rows = list(csv.DictReader((tmp_path / "run_tokenizer_metrics.csv").open()))
    cosine = [1e-4 + 4.5e-4 * (1 + c) for c in (1, 0.5, -0.5, -1)]  # cos(0), cos(pi/3), cos(2 pi/3), cos(pi)
    assert [float(r["lr"]) for r in rows] == pytest.approx(cosine)  # 7.75e-4 at step 1 (linear: 7e-4)
    learn.main(["run_tokenizer", *args, "--eval_every", "1", "--continuous_steps", "2"])  # as many as --steps
    rows = list(csv.DictReader((tmp_path / "run_tokenizer_metrics.csv").open()))
    assert [r["codes_used"] for r in rows] == ["nan"] * 3  # no codebook to the end


def force_class(head: nn.Sequential, cls: int) -> None:
    """Make an MLP head of G output class `cls` whatever its input: last layer's weights 0, a bias far ahead."""
    with torch.no_grad():
        head[-1].weight.zero_()
        head[-1].bias.fill_(-30.0)
        head[-1].bias[cls] = 30.0


def test_learn_imagine_counts_imagined_and_real_rewards_per_100_steps(train_tiny_run, tmp_path, capsys):
    """learn.py imagine: r̂_t per 100 imagined steps (Eq. (2)'s classes -1, 0, +1), beside sign(r_t) per 100 real
    steps; on a G whose heads are forced, on CatchBall, whose rates are known, and on the tiny run."""
    import learn

    run_dir, _ = train_tiny_run
    agent = agent_lib.Agent.load(run_dir / "checkpoint.pt", device="cpu").eval()
    frames = ReplayBuffer.load(run_dir / "replay").observations[:4]  # x_0 of 4 imagined trajectories
    wm_env = WorldModelEnv(agent.tokenizer, agent.world_model)
    force_class(agent.world_model.head_rewards, 0)  # class 0: r̂ = -1 at every step
    force_class(agent.world_model.head_ends, 0)  # never ends
    assert learn.imagined_reward_rate(wm_env, frames, [0, 1], agent.num_actions, horizon=3) == -100.0
    force_class(agent.world_model.head_rewards, 1)  # class 1: r̂ = 0
    assert learn.imagined_reward_rate(wm_env, frames, None, agent.num_actions, horizon=3) == 0.0
    # CatchBall's episodes last 4 steps and pay +1 when the paddle ends under the ball, else -1. Held still, the
    # paddle is under it for 1 start in 4: 100 (1/4 - 3/4) / 4 = -12.5 per 100 steps (1,000 episodes: SE 0.7).
    rate, episodes = learn.real_reward_rate(CATCH_ID, EnvConfig(), [0], 4000, seed=0)
    assert episodes == 1001 and rate == pytest.approx(-12.5, abs=2.5)
    assert learn.action_pattern("2,0", ["0", "1", "2"]) == [2, 0] and learn.action_pattern("random", []) is None
    assert learn.action_pattern("LEFT,FIRE", ["NOOP", "FIRE", "RIGHT", "LEFT"]) == [3, 1]
    with pytest.raises(SystemExit, match="no action 'JUMP'; this game's are NOOP, FIRE"):
        learn.action_pattern("JUMP", ["NOOP", "FIRE"])
    # The whole command on the tiny Pong run: each of Pong's 6 actions held, then the random policy
    args = ["--runs", str(run_dir), "--out", str(tmp_path), "--starts", "4", "--horizon", "2", "--real_steps", "20"]
    learn.main(["imagine", *args])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if " | " in line][1:]
    assert [row[0].strip() for row in rows] == ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE", "random"]
    assert all(-100 <= float(row[1]) <= 100 and row[2].strip().endswith("(1)") for row in rows)


def test_figure4_video_frames_each_imagined_step_by_its_predicted_reward_and_end():
    # Two trajectories of 2 steps after x̂_0, frames of 2x2 pixels whose values name (trajectory, step).
    frames = torch.arange(6, dtype=torch.uint8).view(2, 3, 1, 1, 1).expand(2, 3, 3, 2, 2) * 10
    rewards, ends = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[0, 1], [0, 1]])
    video = agent_lib.figure4_video(frames, rewards, ends, border=1)  # (3, 4, 8, 3)
    assert video.shape == (3, 4, 8, 3)
    boxes = {(0, 0): (0, 0, 0), (0, 1): agent_lib.FIGURE4_REWARD, (0, 2): agent_lib.FIGURE4_END}
    boxes |= {(1, 0): (0, 0, 0), (1, 1): (0, 0, 0), (1, 2): agent_lib.FIGURE4_END}  # a negative reward: no box
    for (n, step), colour in boxes.items():
        panel = video[step, :, 4 * n : 4 * n + 4]  # (4, 4, 3): the frame inside a 1-pixel box
        assert (panel[0] == colour).all() and (panel[:, 0] == colour).all() and (panel[-1] == colour).all()
        assert (panel[1:3, 1:3] == 10 * (3 * n + step)).all()


def test_train_tiny_run_passes_all_phases_and_writes_every_file(train_tiny_run):
    run_dir, stdout = train_tiny_run
    for name in ["config.json", "metrics.csv", "checkpoint.pt", "final_eval.json"]:
        assert (run_dir / name).is_file(), name
    # The dataset is appended to: each epoch's save wrote one chunk of its 50 new steps, never the whole dataset.
    chunks = sorted((run_dir / "replay").iterdir())
    assert [p.name for p in chunks] == [f"steps_{50 * k:010d}.pt" for k in range(6)]
    assert max(p.stat().st_size for p in chunks) < 1.01 * min(p.stat().st_size for p in chunks)
    assert sorted(p.name for p in (run_dir / "media").iterdir()) == [
        "imagination_epoch0005.gif",
        "imagination_epoch0006.gif",
        "reconstructions_epoch0005.png",
        "reconstructions_epoch0006.png",
    ]
    rows = _train_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [int(r["env_steps"]) for r in rows] == [50, 100, 150, 200, 250, 300]
    # Warm-up delays (Table 5, scaled down): E, D from epoch 2, G from epoch 4, π and V from epoch 6.
    assert rows[0]["tokenizer/total"] == "" and rows[1]["tokenizer/total"] != ""
    assert rows[2]["world_model/total"] == "" and rows[3]["world_model/total"] != ""
    assert rows[4]["actor_critic/total"] == "" and rows[5]["actor_critic/total"] != ""
    last = {k: float(v) for k, v in rows[-1].items() if v != ""}
    losses = [k for k in last if k.split("/")[0] in agent_lib.COMPONENTS]
    assert len(losses) > 10 and all(math.isfinite(last[k]) for k in losses)
    # Both models learn: their losses fall from the first epoch each trained to the last.
    assert float(rows[-1]["tokenizer/reconstruction"]) < float(rows[1]["tokenizer/reconstruction"])
    assert float(rows[-1]["world_model/transition"]) < float(rows[3]["world_model/transition"])
    # E's use of its codebook on the dataset at epoch 6, worked out again with the checkpoint's E (frozen since).
    agent = agent_lib.Agent.load(run_dir, device="cpu").eval()
    with torch.no_grad():
        z = agent.tokenizer.encode(ReplayBuffer.load(run_dir / "replay").observations)  # (300, K)
    assert int(rows[-1]["tokenizer/codes_used"]) == len(z.unique())
    assert int(rows[-1]["tokenizer/distinct_frames"]) == len(z.unique(dim=0))
    final = json.loads((run_dir / "final_eval.json").read_text())
    assert final["game"] == "Pong" and len(final["returns"]) == 1 and -21 <= final["mean_return"] <= 21
    assert json.loads((run_dir / "config.json").read_text())["tokenizer"]["vocab_size"] == 64
    assert "epoch 6 | env_steps 300" in stdout


def test_train_checkpoint_loads_into_a_fresh_agent_that_acts(train_tiny_run):
    run_dir, _ = train_tiny_run
    agent = agent_lib.Agent.load(run_dir, device="cpu")
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 6 and checkpoint["env_steps"] == 300 and checkpoint["game"] == "Pong"
    assert set(checkpoint["optimizers"]) == set(agent_lib.COMPONENTS)
    assert not any("vgg" in key or "perceptual" in key for key in checkpoint["agent"]["tokenizer"])
    for name in agent_lib.COMPONENTS:  # the weights are the trained ones, not a fresh initialisation
        for key, value in getattr(agent, name).state_dict().items():
            assert torch.equal(value, checkpoint["agent"][name][key]), key
    env = make_env("Pong", train=False, seed=0)
    obs, _ = env.reset(seed=0)
    first = np.array([True])
    for _ in range(5):
        action = agent.act(obs[None], first, temperature=0.5)
        assert action.shape == (1,) and 0 <= action[0] < env.action_space.n
        obs, *_ = env.step(int(action[0]))
        first = np.array([False])
    assert len(ReplayBuffer.load(run_dir / "replay")) == 300


def test_train_resume_after_a_kill_reaches_the_uninterrupted_result(tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = start_script("train.py", *TINY_FLAGS, "--epochs", "4", "--out", str(run_dir), stdout=subprocess.DEVNULL)
    wait_for(lambda: (run_dir / "metrics.csv").is_file() and len(_train_metrics(run_dir)) >= 2, proc)
    proc.send_signal(signal.SIGKILL)  # as soon as two epochs are on disk
    proc.wait()
    done = len(_train_metrics(run_dir))
    assert 2 <= done < 4
    for stale in (".checkpoint.pt.x1y2.tmp", "replay/.steps_0000000150.pt.x1y2.tmp"):  # a kill -9 in a save
        (run_dir / stale).write_bytes(b"partial")
    assert run_main(train.main, "--resume", str(run_dir)) is None
    assert f"removed 2 temporary files of a killed save in {run_dir}" in capsys.readouterr().out
    rows = _train_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]  # nothing repeated, nothing lost
    assert [int(r["env_steps"]) for r in rows] == [50, 100, 150, 200]
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 4 and checkpoint["env_steps"] == 200
    assert len(ReplayBuffer.load(run_dir / "replay")) == 200  # the dataset of an uninterrupted run
    assert not list(run_dir.rglob("*.tmp"))
    assert (run_dir / "final_eval.json").is_file()


def test_train_resume_refuses_missing_or_corrupt_checkpoint(tmp_path):
    assert "no checkpoint.pt" in run_main(train.main, "--resume", str(tmp_path))
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    message = run_main(train.main, "--resume", str(tmp_path))
    assert "corrupt" in message and str(tmp_path / "checkpoint.pt") in message
    with pytest.raises(SystemExit):
        train.parse_args(["--resume", str(tmp_path), "--seed", "3"])  # a resumed run keeps its config


def test_train_collection_burns_in_its_lstm_state_after_an_evaluation(tmp_path):
    """As the reference collector: each collection call burns the LSTM state in over the last burn_in frames of
    the current episode, so an evaluation in the middle of an episode leaves no blank or stale state."""
    # A 10-step test episode (40 frames): the evaluation is there to disturb the state.
    config = tiny_config({"out": str(tmp_path / "run"), "env.max_test_frames": 40})
    run = train.new_run(config)
    agent, burn_in = run.agent, config.actor_critic.burn_in
    train.collect_experience(run, 2 * burn_in)  # Pong ends no episode this early
    train.evaluate_agent(run, num_episodes=1)
    assert not run.first  # the training episode goes on after the evaluation
    with torch.no_grad():
        past = agent.tokenizer.encode_decode(run.replay.observations[-burn_in:][None])  # x̂ of the last frames
        state = agent.actor_critic.burn_in(past, torch.ones(1, burn_in, dtype=torch.bool))
        x_hat = agent.tokenizer.encode_decode(torch.as_tensor(run.obs).permute(2, 0, 1)[None])  # (1, 3, 64, 64)
        expected, _, expected_state = agent.actor_critic(x_hat, state)
        blank, _, _ = agent.actor_critic(x_hat, agent.actor_critic.initial_state(1))
    assert (expected - blank).abs().max() > 1e-4  # a blank state would give another distribution
    train.collect_experience(run, 1)  # acts with π(· | x̂_t) after the burn-in, then moves the state on
    torch.testing.assert_close(agent.state, expected_state, rtol=0, atol=1e-6)


def tiny_agent(settings: dict | None = None) -> agent_lib.Agent:
    """An untrained agent of the tests' tiny config, in eval mode (no dropout: outputs are compared exactly)."""
    return agent_lib.Agent(tiny_config(settings), num_actions=6, device="cpu").eval()


def test_train_encode_once_per_epoch_gives_the_same_tokens_and_losses(pong):
    """The token cache (IRISConfig.cache_tokens) changes the speed, not the numbers."""
    agent, replay = tiny_agent(), pong_replay(pong)
    cfg = agent.config
    cfg.encode_batch_size = 7  # chunks of odd size on purpose
    run = train.Run(cfg, agent, agent.make_optimizers(), replay, Path("unused"))
    run.tokens = train.encode_dataset(run, epoch=cfg.epochs)
    assert run.tokens.shape == (len(replay), cfg.tokenizer.tokens_per_frame)
    assert torch.equal(run.tokens, agent.tokenizer.encode(replay.observations))
    torch.manual_seed(0)
    batch = replay.sample(8, cfg.world_model.max_timesteps, sample_from_start=True)
    cached = train.segment_tokens(run, batch)
    uncached = agent.tokenizer.encode(batch["observations"])
    assert torch.equal(cached[batch["mask"]], uncached[batch["mask"]])
    agent.world_model.eval()  # no dropout: two evaluations must agree exactly
    args = batch["actions"], batch["rewards"], batch["ends"], batch["mask"]
    with_cache, without = agent.world_model.loss(cached, *args), agent.world_model.loss(uncached, *args)
    for key in ("transition", "reward", "termination"):
        assert torch.equal(with_cache[key], without[key]), key
    # Actor-critic batches: burn-in and x_0 from the cache, left padding included.
    torch.manual_seed(1)
    batch = replay.sample(8, cfg.actor_critic.burn_in + 1, sample_from_start=False)
    assert not batch["mask"].all()  # some segments are padded at the start
    wm_env = WorldModelEnv(agent.tokenizer, agent.world_model)
    outs = []
    for tokens in (train.segment_tokens(run, batch), None):
        torch.manual_seed(2)
        outs.append(
            imagine(
                agent.actor_critic,
                wm_env,
                batch["observations"],
                batch["mask"],
                cfg.actor_critic.imagination_horizon,
                tokens=tokens,
            )
        )
    for name in ("actions", "logits", "values", "rewards", "ends", "frames"):
        assert torch.equal(getattr(outs[0], name), getattr(outs[1], name)), name


# Fast paths (IRISConfig, Speed): each changes the time, not the algorithm; each is compared with the plain path.


def _train_tiny_agents(**fast) -> tuple[agent_lib.Agent, agent_lib.Agent]:
    """A tiny agent with the fast paths off, and a copy with the same weights and the given fast-path fields."""
    plain = tiny_agent({"fused_adam": False})
    other = agent_lib.Agent(replace(plain.config, **fast), num_actions=plain.num_actions, device="cpu").eval()
    other.load_state_dict(plain.state_dict())
    return plain, other


def test_train_bf16_autocast_stays_close_to_fp32(pong):
    """bf16 = "always" runs every forward pass of train.py in bf16 autocast (CUDA's default, "cuda", here on CPU)."""
    agent, replay = tiny_agent(), pong_replay(pong)
    cfg = agent.config
    run = train.Run(cfg, agent, agent.make_optimizers(), replay, Path("unused"))
    frames = replay.observations[:16]  # (16, 3, 64, 64) uint8
    torch.manual_seed(0)
    batch = replay.sample(8, cfg.world_model.max_timesteps, sample_from_start=True)
    tokens = agent.tokenizer.encode(batch["observations"])
    args = batch["actions"], batch["rewards"], batch["ends"], batch["mask"]
    frame_tokens = agent.tokenizer.encode(frames)  # (16, K), fp32
    results = {}
    for mode in ("never", "always"):
        cfg.bf16 = mode
        with torch.no_grad(), agent.autocast():
            reconstructions = agent.tokenizer.decode(frame_tokens)  # the same z in both: D alone is compared
            logits, values, _ = agent.actor_critic(reconstructions, agent.actor_critic.initial_state(16))
            results[mode] = (
                agent.tokenizer.loss(frames)["total"],
                agent.world_model.loss(tokens, *args)["total"],
                reconstructions,
                logits,
                values,
                agent.tokenizer.encode(frames),
            )
    assert results["always"][2].dtype == torch.bfloat16 and results["never"][2].dtype == torch.float32
    for fp32, bf16 in zip(results["never"][:-1], results["always"][:-1]):
        error = (bf16.float() - fp32).abs()
        print(f"bf16 vs fp32: mean abs error {error.mean():.1e}, max {error.max():.1e}, of {fp32.abs().mean():.1e}")
        # bf16 keeps 8 significant bits (0.4%); over D's ~40 layers errors add up to ~1.5% (mean) of the frames
        assert error.mean() < 0.03 * fp32.abs().mean() + 1e-3 and error.max() < 0.2
    # bf16 rounding of E(x) can flip the nearest code where two codes are almost equally near, rarely
    assert (results["always"][-1] == results["never"][-1]).float().mean() > 0.9
    # An update of each component under autocast: finite losses, and weights that move.
    cfg.bf16, cfg.training_steps_per_epoch = "always", 1
    run.tokens = train.encode_dataset(run, epoch=cfg.epochs)
    before = [p.detach().clone() for p in agent.parameters()]
    agent.train()
    metrics = {
        **train.train_steps(run, "tokenizer", lambda: agent.tokenizer.loss(frames)),
        **train.train_steps(run, "world_model", lambda: train.world_model_loss(run)),
        **train.train_steps(
            run, "actor_critic", lambda: train.behavior_loss(run, WorldModelEnv(agent.tokenizer, agent.world_model))
        ),
    }
    assert all(np.isfinite(value) for value in metrics.values()), metrics
    assert all(not torch.equal(b, p) for b, p in zip(before, agent.parameters()) if p.grad is not None)


def test_train_fused_adam_gives_the_same_updates():
    plain, fused = _train_tiny_agents(fused_adam=True)
    optimizers = [agent.make_optimizers() for agent in (plain, fused)]
    assert optimizers[1]["tokenizer"].defaults["fused"] and optimizers[1]["world_model"].defaults["fused"]
    assert not optimizers[0]["actor_critic"].defaults["fused"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in plain.parameters()]
        for agent, opts in zip((plain, fused), optimizers):
            for p, g in zip(agent.parameters(), grads):
                p.grad = g.clone()
            for optimizer in opts.values():
                optimizer.step()
    for p, q in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_train_channels_last_gives_the_same_outputs(pong):
    plain, nhwc = _train_tiny_agents(channels_last=True)
    assert nhwc.tokenizer.decoder[0].weight.is_contiguous(memory_format=torch.channels_last)
    frames = pong.frames[:4]
    with torch.no_grad():
        outputs = []
        for agent in (plain, nhwc):
            tokens = agent.tokenizer.encode(frames)
            reconstructions = agent.tokenizer.decode(tokens)
            logits, values, _ = agent.actor_critic(reconstructions, agent.actor_critic.initial_state(4))
            outputs.append((tokens, reconstructions, logits, values))
    assert torch.equal(outputs[0][0], outputs[1][0])
    for a, b in zip(outputs[0][1:], outputs[1][1:]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_train_reuse_freed_memory_stops_page_faults_of_large_tensors():
    """With reuse_freed_memory, a 64 MiB tensor freed and allocated again reuses its pages (no fresh mmap)."""
    import resource

    def faults_of_one_allocation() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(2**24)  # 64 MiB, written in full, then freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert agent_lib.reuse_freed_memory()
    faults = [faults_of_one_allocation() for _ in range(6)]  # the first ones grow the heap
    print(f"page faults of six 64 MiB allocations in a row: {faults}")
    # glibc's default: about 16,000 faults (one per 4 KiB page) every time. With the fix, once the heap has grown
    # (measured: after 2 or 3 allocations), each allocation lands in pages kept from the earlier ones.
    assert faults[-1] < 1000


# ---------------------------------------------------------------------------------------------------------------------
# agent.py: the authors' published agents (eloialonso/iris, one <Game>.pt per game)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authors_layout():
    """Our three modules at the paper config with 6 actions (Pong), every parameter perturbed so that no two layers
    of the same shape are equal (norms are all ones at init), and the same numbers in the authors' layout."""
    torch.manual_seed(0)
    modules = {
        "tokenizer": Tokenizer(TokenizerConfig(pretrained_vgg=False)),
        "world_model": WorldModel(WorldModelConfig(), vocab_size=512, tokens_per_frame=16, num_actions=6),
        "actor_critic": ActorCritic(ActorCriticConfig(), num_actions=6, frame_size=EnvConfig().frame_size),
    }
    with torch.no_grad():
        for module in modules.values():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return {name: m.eval() for name, m in modules.items()}, authors_state_dict(
        {name: m.state_dict() for name, m in modules.items()}
    )


def test_authors_checkpoint_layout_converts_and_loads(authors_layout):
    modules, state_dict = authors_layout
    # Names and shapes from the authors' repository (src/models/tokenizer/nets.py, lpips.py, transformer.py,
    # world_model.py, slicer.py, actor_critic.py) at its config/*.yaml, A = 6.
    shapes = {
        "tokenizer.encoder.conv_in.weight": (64, 3, 3, 3),
        "tokenizer.encoder.down.0.block.1.norm2.weight": (64,),
        "tokenizer.encoder.down.2.attn.1.q.weight": (64, 64, 1, 1),  # attention at 16x16 and 8x8: levels 2 and 3
        "tokenizer.encoder.down.3.downsample.conv.weight": (64, 64, 3, 3),
        "tokenizer.encoder.conv_out.bias": (512,),
        "tokenizer.decoder.up.3.attn.2.proj_out.weight": (64, 64, 1, 1),  # 3 blocks per level in D
        "tokenizer.decoder.up.4.upsample.conv.weight": (64, 64, 3, 3),
        "tokenizer.embedding.weight": (512, 512),
        "tokenizer.lpips.net.slice5.28.weight": (512, 512, 3, 3),
        "tokenizer.lpips.lin4.model.1.weight": (1, 512, 1, 1),
        "tokenizer.lpips.scaling_layer.shift": (1, 3, 1, 1),
        "world_model.embedder.embedding_tables.0.weight": (6, 256),
        "world_model.pos_emb.weight": (340, 256),
        "world_model.transformer.blocks.9.attn.query.weight": (256, 256),
        "world_model.transformer.blocks.9.attn.mask": (340, 340),
        "world_model.head_observations.indices": (320,),
        "world_model.head_rewards.head_module.2.weight": (3, 256),
        "world_model.head_ends.indices": (20,),
        "actor_critic.conv4.weight": (64, 64, 3, 3),
        "actor_critic.lstm.weight_ih": (2048, 1024),
        "actor_critic.actor_linear.weight": (6, 512),
        "actor_critic.critic_linear.bias": (1,),
    }
    assert {key: tuple(state_dict[key].shape) for key in shapes} == shapes
    assert not any(".down.4.downsample" in key or ".up.0.upsample" in key for key in state_dict)  # 4 levels, not 5
    # Their heads read: the frame head every position but the last frame token of each block of 17 (index 15), the
    # reward and end heads the action tokens (index 16); their attention masks are causal (config attention: causal).
    assert state_dict["world_model.head_observations.indices"][:18].tolist() == [*range(15), 16, 17, 18]
    assert state_dict["world_model.head_rewards.indices"][:3].tolist() == [16, 33, 50]
    assert torch.equal(state_dict["world_model.head_ends.indices"], torch.arange(16, 340, 17))
    assert torch.equal(state_dict["world_model.transformer.blocks.0.attn.mask"], torch.ones(340, 340).tril())
    # The published Pong.pt is 126,508,385 bytes: these 624 tensors (126,269,588 bytes of float32 and int64) plus
    # names and pickled metadata (torch.save of this dict writes 126,468,319 bytes; Breakout.pt, 4 actions, is
    # 6,144 bytes smaller, as this dict with 4 actions).
    assert len(state_dict) == 624
    assert sum(t.numel() * t.element_size() for t in state_dict.values()) == 126_269_588

    num_actions, converted = convert_authors_state_dict(state_dict)
    assert num_actions == 6
    for name, module in modules.items():
        fresh = {
            "tokenizer": lambda: Tokenizer(TokenizerConfig()),
            "world_model": lambda: WorldModel(WorldModelConfig(), 512, 16, num_actions),
            "actor_critic": lambda: ActorCritic(ActorCriticConfig(), num_actions, EnvConfig().frame_size),
        }[name]()
        fresh.load_state_dict(converted[name])  # strict: every key, every shape
        for key, value in module.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), key


def authors_forward(sd: dict, frames: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The authors' networks written out with torch.nn.functional, from their state_dict's names alone (their
    nets.py, transformer.py, world_model.py and actor_critic.py at the paper config): an independent check of which
    of our layers each of their tensors is, the order of q, k, v included. frames (B, 3, 64, 64) in [0, 1]."""

    def conv(name, h, stride=1, padding=1):
        return F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], stride, padding)

    def norm(name, h):
        return F.group_norm(h, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def resnet_block(name, h):  # no shortcut conv: every level has 64 channels
        out = conv(f"{name}.conv1", F.silu(norm(f"{name}.norm1", h)))
        return h + conv(f"{name}.conv2", F.silu(norm(f"{name}.norm2", out)))

    def attention_block(name, h):  # softmax over key positions of q.k / sqrt(C), then proj_out, residual
        b, c, height, width = h.shape
        q, k, v = (conv(f"{name}.{p}", norm(f"{name}.norm", h), padding=0).flatten(2) for p in "qkv")  # (B, C, hw)
        weights = torch.softmax(q.transpose(1, 2) @ k / c**0.5, dim=-1)  # (B, hw of q, hw of k)
        return h + conv(f"{name}.proj_out", (v @ weights.transpose(1, 2)).view(b, c, height, width), padding=0)

    def blocks(prefix, h, count):
        for i in range(count):
            h = resnet_block(f"{prefix}.block.{i}", h)
            h = attention_block(f"{prefix}.attn.{i}", h) if f"{prefix}.attn.{i}.q.weight" in sd else h
        return h

    def middle(prefix, h):
        return resnet_block(
            f"{prefix}.mid.block_2", attention_block(f"{prefix}.mid.attn_1", resnet_block(f"{prefix}.mid.block_1", h))
        )

    h = conv("tokenizer.encoder.conv_in", frames * 2 - 1)
    for level in range(5):
        h = blocks(f"tokenizer.encoder.down.{level}", h, 2)
        if level < 4:
            h = conv(f"tokenizer.encoder.down.{level}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = conv("tokenizer.encoder.conv_out", F.silu(norm("tokenizer.encoder.norm_out", middle("tokenizer.encoder", h))))
    out = {"y": conv("tokenizer.pre_quant_conv", h, padding=0)}  # E(x), (B, 512, 4, 4)
    h = conv("tokenizer.decoder.conv_in", conv("tokenizer.post_quant_conv", out["y"], padding=0))
    h = middle("tokenizer.decoder", h)
    for level in reversed(range(5)):
        h = blocks(f"tokenizer.decoder.up.{level}", h, 3)
        if level > 0:
            h = conv(f"tokenizer.decoder.up.{level}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    out["decoded"] = conv("tokenizer.decoder.conv_out", F.silu(norm("tokenizer.decoder.norm_out", h)))

    B, T = tokens.shape  # interleaved z_0^1..z_0^16, a_0, ...
    is_action = torch.arange(T) % 17 == 16
    x = torch.empty(B, T, 256)
    x[:, is_action] = F.embedding(tokens[:, is_action], sd["world_model.embedder.embedding_tables.0.weight"])
    x[:, ~is_action] = F.embedding(tokens[:, ~is_action], sd["world_model.embedder.embedding_tables.1.weight"])
    x = x + sd["world_model.pos_emb.weight"][:T]

    def linear(name, h):
        return F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def layer_norm(name, h):
        return F.layer_norm(h, (256,), sd[f"{name}.weight"], sd[f"{name}.bias"])

    for i in range(10):
        p = f"world_model.transformer.blocks.{i}"
        h = layer_norm(f"{p}.ln1", x)
        q, k, v = (linear(f"{p}.attn.{n}", h).view(B, T, 4, 64).transpose(1, 2) for n in ("query", "key", "value"))
        att = (q @ k.transpose(-2, -1) / 8.0).masked_fill(sd[f"{p}.attn.mask"][:T, :T] == 0, float("-inf"))
        x = x + linear(f"{p}.attn.proj", (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, 256))
        x = x + linear(f"{p}.mlp.2", F.gelu(linear(f"{p}.mlp.0", layer_norm(f"{p}.ln2", x))))
    x = layer_norm("world_model.transformer.ln_f", x)
    for head in ("head_observations", "head_rewards", "head_ends"):  # at every position, before their slicing
        out[head] = linear(f"world_model.{head}.head_module.2", F.relu(linear(f"world_model.{head}.head_module.0", x)))

    h = frames * 2 - 1
    for i in range(1, 5):
        h = F.relu(F.max_pool2d(conv(f"actor_critic.conv{i}", h), 2))
    # LSTM cell from the zero state (h W_hh = 0)
    gates = (
        h.flatten(1) @ sd["actor_critic.lstm.weight_ih"].t()
        + sd["actor_critic.lstm.bias_ih"]
        + sd["actor_critic.lstm.bias_hh"]
    )
    i_gate, _, g_gate, o_gate = gates.chunk(4, dim=1)  # input, forget, cell, output (forget gate times c = 0)
    h = torch.sigmoid(o_gate) * torch.tanh(torch.sigmoid(i_gate) * torch.tanh(g_gate))
    out["policy_logits"] = linear("actor_critic.actor_linear", h)
    out["values"] = linear("actor_critic.critic_linear", h)
    return out


def test_authors_checkpoint_gives_the_same_outputs(authors_layout):
    modules, state_dict = authors_layout
    num_actions, converted = convert_authors_state_dict(state_dict)
    loaded = {
        "tokenizer": Tokenizer(TokenizerConfig()),
        "world_model": WorldModel(WorldModelConfig(), 512, 16, 6),
        "actor_critic": ActorCritic(ActorCriticConfig(), num_actions, EnvConfig().frame_size),
    }
    for name, module in loaded.items():
        module.load_state_dict(converted[name])
        module.eval()
    frames = random_frames(2)  # (B, 3, 64, 64) uint8
    generator = torch.Generator().manual_seed(0)
    tokens = interleave(
        torch.randint(0, 512, (2, 3, 16), generator=generator), torch.randint(0, 6, (2, 3), generator=generator)
    )  # (B, 3 * 17)
    with torch.no_grad():
        outputs = []
        for agent in (modules, loaded):  # the project agent, and the one loaded from the authors' layout
            obs_tokens = agent["tokenizer"].encode(frames)
            hidden = agent["world_model"](tokens)
            logits, values, _ = agent["actor_critic"](frames / 255, agent["actor_critic"].initial_state(2))
            outputs.append(
                [
                    obs_tokens,
                    agent["world_model"].head_observations(hidden),
                    agent["world_model"].head_rewards(hidden),
                    agent["world_model"].head_ends(hidden),
                    logits,
                    values,
                ]
            )
        for ours, theirs in zip(*outputs):
            assert torch.equal(ours, theirs)

        # The authors' networks, run from their state_dict, compute what the converted modules compute.
        reference = authors_forward(state_dict, frames / 255, tokens)
        tokenizer = loaded["tokenizer"]
        x = tokenizer._preprocess(frames)
        close = dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tokenizer._encode_continuous(x), reference["y"], **close)
        torch.testing.assert_close(tokenizer._decode_continuous(reference["y"]), reference["decoded"], **close)
        hidden = loaded["world_model"](tokens)
        for head in ("head_observations", "head_rewards", "head_ends"):
            torch.testing.assert_close(getattr(loaded["world_model"], head)(hidden), reference[head], **close)
        logits, values, _ = loaded["actor_critic"](frames / 255, loaded["actor_critic"].initial_state(2))
        torch.testing.assert_close(logits, reference["policy_logits"], **close)
        torch.testing.assert_close(values, reference["values"].squeeze(-1), **close)


def test_authors_checkpoint_refuses_other_files(authors_layout, tmp_path):
    modules, state_dict = authors_layout

    def refused(candidate) -> str:
        with pytest.raises(ValueError, match="Not one of the authors' IRIS checkpoints") as info:
            convert_authors_state_dict(candidate)
        message = str(info.value)
        assert "actor_critic.actor_linear.weight of shape (A, 512)" in message  # says what was expected
        return message

    missing = {k: v for k, v in state_dict.items() if k != "world_model.transformer.blocks.3.attn.key.bias"}
    assert "1 missing tensors ['world_model.transformer.blocks.3.attn.key.bias']" in refused(missing)
    extra = {**state_dict, "world_model.transformer.blocks.10.ln1.weight": torch.ones(256)}  # 11 layers
    assert "1 unexpected" in refused(extra)
    four_actions = {**state_dict, "world_model.embedder.embedding_tables.0.weight": torch.zeros(4, 256)}
    assert "embedding_tables.0.weight (4, 256) instead of (6, 256)" in refused(four_actions)
    wide = {**state_dict, "world_model.pos_emb.weight": torch.zeros(340, 512)}
    assert "pos_emb.weight (340, 512) instead of (340, 256)" in refused(wide)
    block_causal = dict(state_dict)  # the authors' other attention option: a frame's tokens see each other
    block_causal["world_model.transformer.blocks.0.attn.mask"] = (
        torch.ones(340, 340).tril().index_fill(1, torch.arange(16), 1.0)
    )
    assert "attn.mask is not the paper config's" in refused(block_causal)
    no_head = {k: v for k, v in state_dict.items() if not k.startswith("actor_critic.")}
    assert "no actor head" in refused(no_head)

    # This project's own files: a checkpoint dict, and an agent's state_dict.
    ours = {name: module.state_dict() for name, module in modules.items()}
    project_checkpoint = {"config": {}, "game": "Pong", "num_actions": 6, "agent": ours}
    assert "Agent.load(path)" in refused(project_checkpoint)
    flat = {f"{name}.{key}": value for name, sd in ours.items() for key, value in sd.items()}
    assert "this project's Agent" in refused(flat)
    path = tmp_path / "Pong.pt"
    torch.save(project_checkpoint, path)
    with pytest.raises(ValueError, match="checkpoint of this project"):
        load_authors_checkpoint(path)
    assert "not a state_dict" in refused([1, 2, 3])


def test_authors_checkpoint_loads_as_an_agent_for_evaluate(authors_layout, tmp_path):
    """Agent.from_authors_checkpoint and evaluate.py's --authors_checkpoint read the file, the game and A from it."""
    modules, state_dict = authors_layout
    path = tmp_path / "Pong.pt"
    torch.save(state_dict, path)
    agent, checkpoint, game = evaluate.load_agent(path, None, "cpu", authors=True)  # the game from the file name
    assert game == "Pong" and agent.config.game == "Pong" and agent.num_actions == checkpoint["num_actions"] == 6
    assert not agent.training and agent.config == agent_lib.IRISConfig(game="Pong")  # the paper config
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            assert torch.equal(getattr(agent, name).state_dict()[key], value), (name, key)
    video = tmp_path / "authors.gif"
    play.main(["--authors_checkpoint", str(path), "--record", str(video), "--steps", "2"])  # play.py watches it too
    assert PIL.Image.open(video).n_frames == 2
    breakout = tmp_path / "Breakout.pt"  # Pong's 6 actions where Breakout has 4
    path.rename(breakout)
    with pytest.raises(evaluate.EvaluationError, match="6 actions but Breakout's action set has 4"):
        evaluate.load_agent(breakout, None, "cpu", authors=True)
    torch.save({"config": {}, "game": "Pong", "num_actions": 6, "agent": {}}, path)
    message = run_main(evaluate.main, "--authors_checkpoint", str(path), "--episodes", "1")
    assert "checkpoint of this project" in message and "Agent.load" in message


# ---------------------------------------------------------------------------------------------------------------------
# play.py
# ---------------------------------------------------------------------------------------------------------------------


def _play_agent(run_dir: Path, ends: bool | None = None) -> agent_lib.Agent:
    """The tiny untrained Pong agent of a run directory; ends True or False: G predicts d̂ = 1 always, or never."""
    agent = agent_lib.Agent.from_checkpoint(agent_lib.load_checkpoint(run_dir), "cpu")
    if ends is not None:
        with torch.no_grad():  # the logits of (no end, end) become (∓20, ±20) whatever the input
            agent.world_model.head_ends[-1].weight.zero_()
            agent.world_model.head_ends[-1].bias.copy_(torch.tensor([-20.0, 20.0] if ends else [20.0, -20.0]))
    return agent


@pytest.mark.parametrize("mode,suffix", [("watch", ".gif"), ("watch", ".mp4"), ("dream", ".gif"), ("dream", ".mp4")])
def test_play_records_each_mode_headless(evaluate_tiny_pong_run, tmp_path, monkeypatch, mode, suffix):
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER"):  # no display at all: the recording needs none
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / f"{mode}{suffix}"
    play.main(
        [str(evaluate_tiny_pong_run), "--record", str(out), "--steps", "5", "--device", "cpu"]
        + (["--dream", "--horizon", "3"] if mode == "dream" else [])
    )
    assert video_shapes(out) == [(play.HEIGHT, play.WIDTH, 3)] * 5


def test_play_keys_follow_ale_action_meanings():
    for game in ("Pong", "Breakout"):
        env = make_env(game)
        meanings = env.unwrapped.get_action_meanings()
        env.close()
        mapping = play.key_mapping(meanings, game)
        for action, meaning in enumerate(meanings):  # each action's own keys give it back
            pressed = {d for d in play.DIRECTIONS if d in meaning}
            assert play.action_for(pressed, mapping) == action, (game, meaning)
        assert play.action_for(set(), mapping) == meanings.index("NOOP")
    assert meanings == ["NOOP", "FIRE", "RIGHT", "LEFT"]  # Breakout: no RIGHTFIRE, so Right + Space moves
    assert play.action_for({"RIGHT", "FIRE"}, mapping) == 2 and play.action_for({"UP"}, mapping) == 0
    pong = ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]
    assert play.mapping_text(play.key_mapping(pong), pong) == (
        "Space=FIRE  Right=RIGHT  Left=LEFT  Right+Space=RIGHTFIRE  Left+Space=LEFTFIRE"
    )
    full = gym.make("ALE/Pong-v5", full_action_space=True).unwrapped.get_action_meanings()
    assert len(set(play.key_mapping(full).values())) == 18  # all 18 ALE actions have keys of their own
    with pytest.raises(play.PlayError, match="no keys for Mygame's actions JUMP"):
        play.key_mapping(["NOOP", "FIRE", "JUMP"], "Mygame")


@pytest.mark.parametrize("mode", ["watch", "human"])
def test_play_window_runs_a_few_frames_and_quits_on_q(evaluate_tiny_pong_run, monkeypatch, mode):
    import pygame

    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    pong = ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]
    mapping = play.key_mapping(pong) if mode == "human" else None
    agent = _play_agent(evaluate_tiny_pong_run, ends=False)
    player = play.make_player(
        agent, "watch" if mode == "watch" else "dream", evaluate_tiny_pong_run, seed=0, temperature=0.5, horizon=100
    )
    advance, actions = player.advance, []

    def advance_then_press_q(action=None):
        actions.append(advance(action))
        if len(actions) == 3:  # as if the user pressed Q now
            pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_q, mod=0, unicode="q", scancode=0))

    monkeypatch.setattr(player, "advance", advance_then_press_q)
    held = {pygame.K_RIGHT: True, pygame.K_SPACE: True}  # the human holds Right and Space down
    monkeypatch.setattr(pygame.key, "get_pressed", lambda: collections.defaultdict(bool, held))
    assert play.run_window(player, play.Screen(mode, "Pong", pong), fps=60, mapping=mapping) == 3
    assert player.steps == 3 and (mode == "watch" or actions == [pong.index("RIGHTFIRE")] * 3)


def test_play_dream_frames_equal_world_model_env_with_same_actions_and_seed(evaluate_tiny_pong_run):
    agent = _play_agent(evaluate_tiny_pong_run, ends=False)
    dream = play.make_player(agent, "dream", evaluate_tiny_pong_run, seed=3, temperature=1.0, horizon=100)
    frames, actions, rewards = [dream.view().seen], [], []
    for _ in range(6):  # past the tiny G's context of 4 steps: the cache is refilled on the way
        actions.append(dream.advance())
        frames.append(dream.view().seen)
        rewards.append(dream.reward)
    torch.manual_seed(3)
    wm_env = WorldModelEnv(agent.tokenizer, agent.world_model)
    expected, expected_rewards = [play.to_image(wm_env.reset(dream.start))], []
    for action in actions:
        reward, end, frame = wm_env.step(torch.tensor([action]))
        expected.append(play.to_image(frame))
        expected_rewards.append(float(reward[0]))
        assert not end.any()
    assert len(set(actions)) > 1  # the policy's own draws chose them
    assert all(np.array_equal(a, b) for a, b in zip(frames, expected)) and rewards == expected_rewards


def test_play_dream_starts_over_after_an_end_or_the_horizon(evaluate_tiny_pong_run):
    agent = _play_agent(evaluate_tiny_pong_run, ends=True)
    dream = play.make_player(agent, "dream", evaluate_tiny_pong_run, seed=0, temperature=1.0, horizon=100)
    assert dream.advance(action=1) == 1 and dream.view().end  # d̂ = 1: the frame gets Figure 4's red box
    image = play.Screen("dream", "Pong", ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]).draw(
        dream.view(), 1.0, 15
    )
    assert tuple(image[0, play.PANEL]) == agent_lib.FIGURE4_END and tuple(image[0, 0]) == play.DARK
    assert dream.advance() is None and dream.steps == 0 and not dream.end  # a new dream from a new real frame
    agent = _play_agent(evaluate_tiny_pong_run, ends=False)
    dream = play.make_player(agent, "dream", evaluate_tiny_pong_run, seed=0, temperature=1.0, horizon=2)
    assert [dream.advance() is None for _ in range(4)] == [False, False, True, False]


def test_play_dream_starts_from_the_runs_replay_frames(evaluate_tiny_pong_run, tmp_path, pong):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes((evaluate_tiny_pong_run / "checkpoint.pt").read_bytes())
    frames, replay = pong.frames[:12:2], ReplayBuffer()
    for t, frame in enumerate(frames):
        replay.add(frame, action=0, reward=0.0, terminated=t == len(frames) - 1)
    replay.save(run_dir / "replay")
    dream = play.make_player(_play_agent(run_dir), "dream", run_dir, seed=0, temperature=1.0, horizon=1)
    assert dream.starts.env is None  # no real env: every x_0 is a stored frame
    for _ in range(3):
        assert any(torch.equal(dream.start[0], frame) for frame in frames)
        dream.advance()
        dream.advance()  # past the horizon of one step: a new x_0


def test_play_errors_say_what_to_do(evaluate_tiny_pong_run, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="no checkpoint at .*checkpoint.pt"):
        play.main([str(tmp_path), "--record", str(tmp_path / "x.gif")])
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit):
        play.main([str(evaluate_tiny_pong_run)])
    assert "no display available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        play.main([str(evaluate_tiny_pong_run), "--human", "--record", str(tmp_path / "x.mp4")])
    assert "--human needs you at the keyboard" in capsys.readouterr().err


# Runs are safe: every setting range-checked before the disk is touched, no overwrite, one writer, clean stops.

INVALID_SETTINGS = [  # (field, a value out of its range) for every leaf field of IRISConfig; tiny preset otherwise
    ("game", 5),
    ("out", None),
    ("seed", -1),
    ("device", "gpu"),
    ("epochs", 0),
    ("epochs", -3),
    ("collection_epochs", 0),
    ("env_steps_per_epoch", 0),
    ("training_steps_per_epoch", 0),
    ("collect_epsilon", 5.0),
    ("collect_temperature", -0.5),
    ("eval_temperature", -1.0),
    ("start_tokenizer_after_epochs", -1),
    ("start_world_model_after_epochs", -1),
    ("start_actor_critic_after_epochs", -1),
    ("tokenizer_batch_size", 0),
    ("world_model_batch_size", -5),
    ("actor_critic_batch_size", 0),
    ("learning_rate", 0.0),
    ("adam_beta1", 1.0),
    ("adam_beta2", -0.1),
    ("max_grad_norm", 0.0),
    ("eval_every", 0),
    ("eval_episodes", 0),
    ("final_eval_episodes", 0),
    ("eval_envs", 0),
    ("media_trajectories", 0),
    ("cache_tokens", 1),
    ("encode_batch_size", 0),
    ("bf16", "sometimes"),
    ("fused_adam", "yes"),
    ("channels_last", 0),
    ("reuse_freed_memory", None),
    ("tokenizer.resolution", 60),
    ("tokenizer.in_channels", 1),
    ("tokenizer.ch", 0),
    ("tokenizer.ch_mult", ()),
    ("tokenizer.ch_mult", (1,) * 8),
    ("tokenizer.num_res_blocks", 0),
    ("tokenizer.attn_resolutions", (0,)),
    ("tokenizer.z_channels", 0),
    ("tokenizer.vocab_size", 0),
    ("tokenizer.embed_dim", 0),
    ("tokenizer.dropout", 1.0),
    ("tokenizer.num_groups", 3),
    ("tokenizer.perceptual_weight", -1.0),
    ("tokenizer.perceptual_dropout", 1.0),
    ("tokenizer.pretrained_vgg", "no"),
    ("tokenizer.reconstruction_loss", "l3"),
    ("world_model.max_timesteps", 0),
    ("world_model.embed_dim", 65),
    ("world_model.num_layers", 0),
    ("world_model.num_heads", 3),
    ("world_model.embed_dropout", 1.5),
    ("world_model.attn_dropout", -0.1),
    ("world_model.resid_dropout", 1.0),
    ("world_model.weight_decay", -0.01),
    ("world_model.reward_loss", "l1"),
    ("actor_critic.conv_channels", (8,) * 7),
    ("actor_critic.lstm_dim", 0),
    ("actor_critic.burn_in", -1),
    ("actor_critic.imagination_horizon", 0),
    ("actor_critic.gamma", 2.0),
    ("actor_critic.lam", 1.5),
    ("actor_critic.entropy_weight", -0.001),
    ("actor_critic.bootstrap", "authors"),
    ("actor_critic.train_after_end", "yes"),
    ("env.test_noop_max", -1),
    ("env.frame_size", 84),
    ("env.frame_skip", 0),
    ("env.noop_max", -1),
    ("env.repeat_action_probability", 2.0),
    ("env.max_train_frames", 0),
    ("env.max_test_frames", 0),
]


def test_train_invalid_settings_cover_every_config_field():
    assert {name for name, _ in INVALID_SETTINGS} == set(agent_lib.flat_fields(agent_lib.IRISConfig()))


@pytest.mark.parametrize("name, value", INVALID_SETTINGS, ids=[f"{n}={v!r}" for n, v in INVALID_SETTINGS])
def test_train_refuses_an_invalid_setting_before_touching_the_disk(tmp_path, name, value):
    """The message names the field, its value and what is allowed; flags are refused by train.main before the run
    directory exists, values no flag can give (a bool field set to 1, an edited config.json) by validate_config."""
    default = agent_lib.flat_fields(agent_lib.IRISConfig())[name]
    if isinstance(default, bool) or name in ("game", "out"):
        config = train.parse_args(["--preset", "tiny"])[0]
        agent_lib.set_field(config, name, value)
        with pytest.raises(agent_lib.ConfigError, match="invalid config: .*" + name):
            agent_lib.validate_config(config)
        with pytest.raises(agent_lib.ConfigError, match=name):
            agent_lib.Agent(config, num_actions=6)
        return
    text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    with pytest.raises(SystemExit) as exit_info:  # an unknown game too: a value let through never starts a run
        train.main(["--preset", "tiny", "--game", "Pongg", "--out", str(tmp_path / "run"), f"--{name}", text])
    message = str(exit_info.value.code)
    assert message.startswith("error: invalid config: ") and f"{name} = {value!r}" in message, message
    assert "allowed" in message or "divisible" in message or "divide" in message or "differs" in message, message
    assert not (tmp_path / "run").exists()


def test_frame_size_sets_every_models_input_and_is_checked_against_the_convs():
    """env.frame_size (64 in Table 2) is the frame every model takes: E, D, π's convs and the dataset (CatchBall's
    test plays at 32); a size the actor-critic's poolings cannot halve down to whole pixels is refused by name."""
    config = tiny_config({"env.frame_size": 32, "tokenizer.resolution": 32, "tokenizer.ch_mult": (1, 1, 1, 1)})
    agent = agent_lib.Agent(config, num_actions=3)
    frames = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert agent.act(frames, np.ones(2, dtype=bool)).shape == (2,)
    assert agent.actor_critic.lstm.input_size == 16 * 2 * 2  # (8, 8, 16, 16) convs: 32 -> 2 after four poolings
    config.actor_critic.conv_channels = (8,) * 6  # 32 halved 6 times is no whole pixel
    with pytest.raises(agent_lib.ConfigError, match=r"env.frame_size = 32 is not divisible by 64"):
        agent_lib.validate_config(config)


def test_train_refuses_to_overwrite_a_run_unless_asked(train_tiny_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    train.new_run(tiny_config({"out": str(empty)}))  # an existing but empty folder is a new run's
    run_dir = tmp_path / "run"
    shutil.copytree(train_tiny_run[0], run_dir)  # a finished run
    (run_dir / "eval.json").write_text("{}")  # evaluate.py's file, and media of the first run: never to be mixed
    (run_dir / "media" / "old.png").write_text("")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    command = [*TINY_FLAGS, "--epochs", "1", "--out", str(run_dir), "--seed", "3"]
    message = run_main(train.main, *command)  # the run's command again, as after a crash
    assert f"already holds a run: continue it with --resume {run_dir}" in message and "--overwrite" in message
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # untouched
    assert run_main(train.main, *command, "--overwrite") is None
    assert not (run_dir / "eval.json").exists() and not (run_dir / "media" / "old.png").exists()
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 3
    assert (run_dir / "final_eval.json").is_file() and len(_train_metrics(run_dir)) == 1
    assert [p.name for p in (run_dir / "replay").iterdir()] == ["steps_0000000000.pt"]


def test_train_a_second_process_is_refused_with_the_pid_of_the_first(tmp_path):
    run_dir = tmp_path / "run"
    first = start_script("train.py", *TINY_FLAGS, "--epochs", "3", "--out", str(run_dir), stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: (run_dir / "config.json").is_file(), first)  # written once the lock is held
        for args in (["--seed", "1", "--out", str(run_dir)], ["--out", str(run_dir), "--overwrite"]):
            message = run_main(train.main, *TINY_FLAGS, "--epochs", "3", *args)
            assert f"in use by another train.py (PID {first.pid})" in message
        wait_for(lambda: (run_dir / "checkpoint.pt").is_file(), first)
        assert f"(PID {first.pid})" in run_main(train.main, "--resume", str(run_dir))
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_train_stops_cleanly_on_a_signal_and_resumes(tmp_path, signum, code):
    """Ctrl-C or a scheduler's SIGTERM mid-epoch: the last complete epoch stays on disk, whole, and one line says
    how to go on; the epoch in progress is lost, and --resume redoes it (once: the same resume after either)."""
    run_dir = tmp_path / "run"
    command = [*TINY_FLAGS, "--epochs", "2", "--out", str(run_dir)]
    proc = start_script("train.py", *command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "metrics.csv").is_file(), proc)  # epoch 1 is saved, or being saved
    proc.send_signal(signum)  # in epoch 2 (collection, then E and D), or in epoch 1's save, which it waits for
    sent = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 15  # within seconds
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and "epoch 2 |" not in stdout
    assert stderr.strip().splitlines()[-1] == (
        f"{signal.Signals(signum).name}: stopped; epoch 1 of 2 is the last complete one (the epoch in progress is "
        f"lost); resume with: python train.py --resume {run_dir}"
    )
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["env_steps"]) == (1, 50) and len(_train_metrics(run_dir)) == 1
    assert len(ReplayBuffer.load(run_dir / "replay")) == 50  # no step of the lost epoch was saved
    assert not list(run_dir.rglob("*.tmp"))
    if signum == signal.SIGINT:
        assert run_main(train.main, "--resume", str(run_dir)) is None
        assert [int(r["env_steps"]) for r in _train_metrics(run_dir)] == [50, 100]
        assert (run_dir / "final_eval.json").is_file()


def test_train_defers_a_signal_during_a_save_and_a_second_one_forces_the_exit():
    script = (
        "import time, agent\n"
        "agent.catch_stop_signals()\n"
        "with agent.deferred_signals():\n"
        "    print('saving', flush=True)\n"
        "    time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "saving\n"
    proc.send_signal(signal.SIGINT)
    time.sleep(1)
    assert proc.poll() is None  # the first Ctrl-C waits for the save
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130


# --- sweeps (issue 17) and aggregate sources ---


def test_aggregate_reads_final_eval_unless_asked_and_names_each_file(tmp_path, capsys):
    """final_eval.json (100 episodes at the end of training) is the score; eval.json only with --score_file."""
    run = tmp_path / "pong0"
    run.mkdir()
    (run / "final_eval.json").write_text(json.dumps({"game": "Pong", "episodes": 100, "mean_return": -5.0}))
    (run / "eval.json").write_text(json.dumps({"game": "Pong", "episodes": 2, "returns": [9.0, 11.0]}))
    out = tmp_path / "aggregate.json"
    evaluate.main(["--aggregate", str(run), "--reps", "100", "--out", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["games"]["Pong"]["returns_per_run"] == [-5.0]
    assert f"Pong                  -5.00  {run / 'final_eval.json'} (100 episodes)" in map(
        str.strip, printed.splitlines()
    )
    evaluate.main(["--aggregate", str(run), "--reps", "100", "--out", str(out), "--score_file", "eval.json"])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["games"]["Pong"]["returns_per_run"] == [10.0]
    assert f"Pong                  10.00  {run / 'eval.json'} (2 episodes)" in map(str.strip, printed.splitlines())
    assert "run directories: eval.json, evaluate.py's evaluations" in printed
    (run / "final_eval.json").unlink()  # eval.json alone is not used in its place, and the message says why
    with pytest.raises(SystemExit, match=r"pong0: no final_eval.json; it holds eval.json: read that with --score_file"):
        evaluate.main(["--aggregate", str(run)])


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"game": "Pong", "mean_return": "high"}', "'mean_return' is 'high', not a finite number"),
        ('{"game": "Pong", "mean_return": null}', "'mean_return' is None, not a finite number"),
        ('{"game": "Pong", "mean_return": NaN}', "'mean_return' is nan, not a finite number"),
        ("[1, 2, 3]", "holds a JSON list, not an object"),
        ('{"game": "Pong", "returns": ["a"]}', r"'returns' is \['a'\], not a non-empty list"),
        ('{"game": "Pong", "returns": []}', r"'returns' is \[\], not a non-empty list"),
        ('{"game": 3, "mean_return": 1}', "does not name its 'game' \\(found 3\\)"),
        ('{"game": "Pong"', "cannot read a run's scores"),
    ],
)
def test_aggregate_malformed_score_file_is_named_not_a_traceback(tmp_path, content, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "final_eval.json").write_text(content)
    with pytest.raises(SystemExit, match=f"evaluate.py: error: {run / 'final_eval.json'}: {message}"):
        evaluate.main(["--aggregate", str(run)])


# Micro runs: 2 epochs of 20 real steps, one training step, one test episode of 10 steps; each run is a train.py.
# fmt: off
SWEEP_MICRO = [
    "--preset", "tiny", "--device", "cpu", "--epochs", "2", "--collection_epochs", "2", "--env_steps_per_epoch", "20",
    "--training_steps_per_epoch", "1", "--eval_episodes", "1", "--final_eval_episodes", "1", "--eval_envs", "1",
    "--env.max_test_frames", "40", "--media_trajectories", "1",
]
# fmt: on
SWEEP_TWO_BY_TWO = ["--games", "Pong,Breakout", "--seeds", "2", "--parallel", "2", *SWEEP_MICRO]


def _sweep_main(*args: str) -> str:
    """sweep.main in this process (its jobs are processes of their own); what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sweep.main(list(args))
    return out.getvalue()


@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory) -> tuple[Path, str]:
    """Pong and Breakout x seeds 0 and 1 through the local executor, to the end; (sweep dir, what it printed)."""

    def build(folder: Path) -> None:
        (folder / "printed.txt").write_text(_sweep_main(*SWEEP_TWO_BY_TWO, "--out", str(folder / "two")))

    folder = built_once(tmp_path_factory, "finished_sweep", build)
    return folder / "two", (folder / "printed.txt").read_text()


def _sweep_epochs_and_steps(run_dir: Path) -> tuple[list[int], list[int], int, int, int]:
    """What a finished run holds: epochs and env steps of metrics.csv, the checkpoint's, the dataset's size."""
    rows = _train_metrics(run_dir)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    return (
        [int(r["epoch"]) for r in rows],
        [int(r["env_steps"]) for r in rows],
        checkpoint["epoch"],
        checkpoint["env_steps"],
        len(ReplayBuffer.load(run_dir / "replay")),
    )


def test_sweep_local_trains_2_games_x_2_seeds_and_writes_the_aggregate(finished_sweep):
    sweep_dir, printed = finished_sweep
    names = ["Pong-s0", "Pong-s1", "Breakout-s0", "Breakout-s1"]
    finals = {name: json.loads((sweep_dir / "runs" / name / "final_eval.json").read_text()) for name in names}
    for name in names:
        assert _sweep_epochs_and_steps(sweep_dir / "runs" / name) == ([1, 2], [20, 40], 2, 40, 40)
    assert "4 runs: 0 pending, 0 running, 4 done, 0 failed" in printed and "IQM (↑)" in printed
    table = (sweep_dir / "aggregate.txt").read_text()
    assert "Optimality Gap (↓)" in table and str(sweep_dir / "runs" / "Pong-s1" / "final_eval.json") in table
    aggregate = json.loads((sweep_dir / "aggregate.json").read_text())
    assert aggregate["games"]["Pong"]["returns_per_run"] == [finals[n]["mean_return"] for n in names[:2]]
    # One JSON of per-run scores in the layout of the authors' IRIS.json (scores.json's "iris"): same game names,
    # one list of mean returns per game, in seed order.
    per_run = json.loads((sweep_dir / "per_run_scores.json").read_text())
    iris = evaluate.load_reference_scores()["iris"]
    assert list(per_run) == ["Breakout", "Pong"] and set(per_run) <= set(iris)
    assert per_run == {
        "Pong": [finals[n]["mean_return"] for n in names[:2]],
        "Breakout": [finals[n]["mean_return"] for n in names[2:]],
    }
    assert all(isinstance(score, float) for scores in per_run.values() for score in scores)


def test_sweep_started_again_when_finished_submits_nothing(finished_sweep):
    sweep_dir, _ = finished_sweep
    jobs_before = sorted((sweep_dir / "submitit").iterdir())
    logs_before = {p.name: p.read_text() for p in (sweep_dir / "logs").iterdir()}
    printed = _sweep_main(*SWEEP_TWO_BY_TWO, "--out", str(sweep_dir))
    assert "nothing to submit: of 4 runs, 4 are done, 0 running" in printed
    assert "Mean (↑)" in printed  # the aggregate, on demand
    assert sorted((sweep_dir / "submitit").iterdir()) == jobs_before  # no job
    assert {p.name: p.read_text() for p in (sweep_dir / "logs").iterdir()} == logs_before  # no train.py
    with pytest.raises(SystemExit, match="was planned with another config \\(epochs differ\\)"):
        _sweep_main(*SWEEP_TWO_BY_TWO, "--epochs", "3", "--out", str(sweep_dir))


def test_sweep_status_prints_each_runs_state_epoch_and_last_return(finished_sweep, tmp_path):
    source, _ = finished_sweep
    status = _sweep_main("--status", str(source))
    final = json.loads((source / "runs" / "Pong-s0" / "final_eval.json").read_text())["mean_return"]
    assert "4 runs: 0 pending, 0 running, 4 done, 0 failed" in status
    assert re.search(rf"Pong-s0 +done +2/2  {final:.2f} \(final, 1 episodes\) +\d+", status)
    # The other states, from the files a sweep leaves: a live job's heartbeat, a failure, a run not started.
    sweep_dir = tmp_path / "copy"
    shutil.copytree(source, sweep_dir)
    for name in ("Pong-s1", "Breakout-s0", "Breakout-s1"):
        (sweep_dir / "runs" / name / "final_eval.json").unlink()
    (sweep_dir / "logs" / "Pong-s1.alive").touch()
    (sweep_dir / "logs" / "Breakout-s0.failed").write_text(json.dumps({"reason": "exit code 1"}))
    stale = sweep_dir / "logs" / "Breakout-s1.alive"  # its job is gone: no heartbeat for minutes
    stale.touch()
    os.utime(stale, (time.time() - 600, time.time() - 600))
    plan = json.loads((sweep_dir / "sweep.json").read_text())
    plan["runs"].append({"name": "Pong-s2", "game": "Pong", "seed": 2, "dir": "runs/Pong-s2"})
    (sweep_dir / "sweep.json").write_text(json.dumps(plan))
    status = _sweep_main("--status", str(sweep_dir))
    evaluated = _train_metrics(sweep_dir / "runs" / "Pong-s1")[-1]["eval/return"]
    assert "5 runs: 2 pending, 1 running, 1 done, 1 failed" in status
    assert re.search(rf"Pong-s1 +running +2/2  {float(evaluated):.2f} \(epoch 2\)", status)
    assert re.search(r"Breakout-s0 +failed +2/2 .* exit code 1, see .*Breakout-s0.log", status)
    assert re.search(r"Breakout-s1 +pending +2/2 ", status)
    assert re.search(r"Pong-s2 +pending +0/2  - +-$", status, re.MULTILINE)
    # evaluate.py --aggregate on the sweep: its finished runs only, the others named.
    result = evaluate.aggregate_runs([sweep_dir], evaluate.EvalConfig(bootstrap_reps=100))
    assert [source["file"] for source in result["sources"]] == [str(sweep_dir / "runs/Pong-s0/final_eval.json")]
    assert [Path(run).name for run in result["unfinished"]] == ["Pong-s1", "Breakout-s0", "Breakout-s1", "Pong-s2"]


def test_sweep_dry_run_prints_the_plan_and_the_projected_gpu_hours(finished_sweep, tmp_path):
    sweep_dir = tmp_path / "planned"
    run_config = sweep.parse_args(["--out", str(sweep_dir), *SWEEP_MICRO])[1]
    bench = {"meta": {"device_name": "NVIDIA A100", "config": asdict(run_config)}, "projection": {"run_hours": 1.5}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    args = ["--games", "Pong,Breakout", "--seeds", "3", "--out", str(sweep_dir), "--dry_run", *SWEEP_MICRO]
    printed = _sweep_main(*args, "--executor", "slurm", "--bench", str(tmp_path / "bench.json"))
    assert "plan: 2 games x 3 seeds = 6 runs" in printed
    assert re.search(r"Breakout-s2 +submit +pending +epoch 0/2", printed)
    assert (
        f"python train.py --game Pong --seed 0 --out {sweep_dir.resolve() / 'runs' / 'Pong-s0'} --preset tiny"
        in printed
    )
    assert "a job array of 3 tasks of 2 runs" in printed and "--time=1440" in printed
    assert "projection (bench.py on NVIDIA A100): 1.5 h per run alone on the device; 6 runs: 9 GPU-hours" in printed
    assert "6 of 6 runs to submit" in printed and not sweep_dir.exists()  # nothing written
    bench["meta"]["config"]["epochs"] = 600  # bench.py timed another config: no projection from it
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    printed = _sweep_main(*args, "--bench", str(tmp_path / "bench.json"))
    assert "projection: none; " in printed and "timed another config (epochs differ)" in printed
    printed = _sweep_main(*SWEEP_TWO_BY_TWO, "--out", str(finished_sweep[0]), "--dry_run")
    assert re.search(r"Pong-s1 +skip +done +epoch 2/2", printed) and "0 of 4 runs to submit" in printed


def test_sweep_job_stopped_mid_run_is_requeued_and_ends_as_an_uninterrupted_run(finished_sweep, tmp_path):
    """USR2 (Slurm's signal before a time limit) to the job running Pong-s0 and its train.py: the job stops train.py,
    submitit requeues the job, the run resumes and ends with the epochs and dataset of the uninterrupted Pong-s0."""
    sweep_dir = tmp_path / "killed"
    run_dir = sweep_dir / "runs" / "Pong-s0"
    command = ["--games", "Pong", "--seeds", "1", "--out", str(sweep_dir), *SWEEP_MICRO]
    proc = start_script("sweep.py", *command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not ((run_dir / "metrics.csv").is_file() and _train_metrics(run_dir)):
        time.sleep(0.05)  # until epoch 1 is saved
    train_pid = int((run_dir / ".lock").read_text())
    job_pid = int(Path(f"/proc/{train_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent: the job
    for pid in (train_pid, job_pid):  # Slurm signals every process of the task; train.py must not die of it
        os.kill(pid, signal.SIGUSR2)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    log = (sweep_dir / "logs" / "Pong-s0.log").read_text()
    # train.py saved and stopped before the requeue (Slurm ends a requeued task's processes at once); then resumed.
    stopped = re.search(r"SIGTERM: stopped; epoch [12] of 2 is the last complete one", log)
    requeued = re.search(r"sweep.py .*: stopped for the job's requeue; train.py exit code 143", log)
    resumed = re.search(f"sweep.py .*: python train.py --resume {run_dir.resolve()}", log)
    assert stopped and requeued and resumed and stopped.start() < requeued.start() < resumed.start(), log
    job_log = "".join(p.read_text() for p in sorted((sweep_dir / "submitit").glob("*_log.*")))
    assert "this job is preempted" in job_log and "Requeued job" in job_log
    uninterrupted = _sweep_epochs_and_steps(finished_sweep[0] / "runs" / "Pong-s0")
    assert _sweep_epochs_and_steps(run_dir) == uninterrupted == ([1, 2], [20, 40], 2, 40, 40)
    assert (run_dir / "final_eval.json").is_file() and "1 runs: 0 pending, 0 running, 1 done" in output


def test_sweep_slurm_submission_script_carries_the_options(tmp_path, monkeypatch):
    """sbatch and srun stand-ins on PATH (no cluster here): submitit writes the real sbatch scripts, kept here."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\n"
        f'n=$(ls {scripts} | wc -l); id=$((4242 + n)); cp "$1" {scripts}/$id.sh; echo "Submitted batch job $id"\n'
    )
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sweep_dir = tmp_path / "table1"
    printed = _sweep_main(
        *["--games", "Pong,Breakout", "--seeds", "3", "--out", str(sweep_dir), "--executor", "slurm"],
        *["--partition", "gpu_p", "--account", "iris", "--time_min", "600", "--cpus_per_task", "10"],
        *["--mem_gb", "40", "--runs_per_gpu", "2", "--sbatch", "mail-type=END", *SWEEP_MICRO],
    )
    array, aggregate = (scripts / "4242.sh").read_text(), (scripts / "4243.sh").read_text()
    for option in (
        "--array=0-2%3",  # 6 runs, 2 per GPU: 3 tasks, all at once (array_parallelism 256)
        "--partition=gpu_p",
        "--account=iris",
        "--time=600",
        "--gpus-per-node=1",
        "--cpus-per-task=10",
        "--mem=40GB",
        "--ntasks-per-node=1",
        "--signal=USR2@120",  # submitit's checkpoint: 2 minutes before the time limit
        "--requeue",
        "--mail-type=END",
        "--job-name=iris-table1",
    ):
        assert f"#SBATCH {option}\n" in array, option
    assert "#SBATCH --dependency=afterany:4242\n" in aggregate and "gpus" not in aggregate
    assert "submitted job array 4242: 3 tasks of 2 runs" in printed
    jobs = json.loads((sweep_dir / "sweep.json").read_text())["jobs"]
    assert jobs == {"Pong-s0": "4242_0", "Pong-s1": "4242_0", "Pong-s2": "4242_1", "Breakout-s0": "4242_1",
                    "Breakout-s1": "4242_2", "Breakout-s2": "4242_2"}  # fmt: skip
    import submitit

    task = submitit.helpers.DelayedSubmission.load(sweep_dir / "submitit" / "4242_1_submitted.pkl").function
    assert isinstance(task, sweep.SweepJob) and task.concurrent == 2
    assert [run["name"] for run in task.runs] == ["Pong-s2", "Breakout-s0"]
    assert re.search(r"Breakout-s2 +pending +0/2  - +4242_2", _sweep_main("--status", str(sweep_dir)))


def test_sweep_reads_the_file_names_train_writes():
    assert (sweep.FINAL_EVAL, sweep.LOCK_FILE) == (train.FINAL_EVAL, train.LOCK_FILE)


# --- reliability (issue 15) -----------------------------------------------------------------------------------------

# Two tiny epochs of 20 steps and 2 training steps each: the smallest run with a checkpoint before the last one.
REL_RUN = [
    "--game",
    "Pong",
    *TINY_FLAGS,
    "--epochs",
    "2",
    "--env_steps_per_epoch",
    "20",
    "--training_steps_per_epoch",
    "2",
]


@pytest.fixture(scope="session")
def rel_finished_run(tmp_path_factory) -> Path:
    def build(folder: Path) -> None:  # in this process, as the resumes below: no interpreter start-up (4 s each)
        assert run_main(train.main, *REL_RUN, "--out", str(folder / "run")) is None

    return built_once(tmp_path_factory, "rel_finished_run", build) / "run"


def _rel_copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def _rel_epoch(path: Path) -> int:
    return torch.load(path, weights_only=False)["epoch"]


def test_rel_a_corrupt_checkpoint_resumes_from_the_previous_epoch(rel_finished_run, tmp_path, capsys):
    run_dir = _rel_copy(rel_finished_run, tmp_path)
    assert (_rel_epoch(run_dir / "checkpoint.pt"), _rel_epoch(run_dir / "checkpoint.prev.pt")) == (2, 1)
    data = (run_dir / "checkpoint.pt").read_bytes()
    (run_dir / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # a truncated write
    capsys.readouterr()
    assert run_main(train.main, "--resume", str(run_dir)) is None
    printed = capsys.readouterr().out
    assert "checkpoint.pt is unreadable (" in printed
    assert "resuming from checkpoint.prev.pt, epoch 1 (20 env steps)" in printed
    rows = _train_metrics(run_dir)
    assert [(int(r["epoch"]), int(r["env_steps"])) for r in rows] == [(1, 20), (2, 40)]  # epoch 2 done again
    assert len(ReplayBuffer.load(run_dir / "replay")) == 40  # cut back to 20 steps, then epoch 2's 20 again
    assert (_rel_epoch(run_dir / "checkpoint.pt"), _rel_epoch(run_dir / "checkpoint.prev.pt")) == (2, 1)
    assert (run_dir / "checkpoint.corrupt.pt").read_bytes() == data[: len(data) // 2]


def test_rel_resuming_a_complete_run_does_nothing(rel_finished_run, tmp_path, capsys):
    run_dir = _rel_copy(rel_finished_run, tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert run_main(train.main, "--resume", str(run_dir)) is None
    printed = capsys.readouterr().out
    assert f"{run_dir}: the run is complete (2 epochs, final_eval.json written); nothing to do" in printed
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_rel_resume_with_more_epochs_extends_a_finished_run(rel_finished_run, tmp_path, capsys):
    run_dir = _rel_copy(rel_finished_run, tmp_path)
    for flags in (["--seed", "3"], ["--preset", "tiny", "--learning_rate", "0.1"]):  # only the schedule may change
        with pytest.raises(SystemExit):
            train.parse_args(["--resume", str(run_dir), "--epochs", "3", *flags])
        assert "drop " + ", ".join(sorted(f for f in flags if f.startswith("--"))) in capsys.readouterr().err
    assert run_main(train.main, "--resume", str(run_dir), "--epochs", "3") is None
    assert "extended the run: epochs 2 -> 3" in capsys.readouterr().out
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 3
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["config"]["epochs"]) == (3, 3)
    assert [int(r["epoch"]) for r in _train_metrics(run_dir)] == [1, 2, 3]
    assert json.loads((run_dir / "final_eval.json").read_text())["epoch"] == 3
    assert json.loads((run_dir / "final_eval_epoch0002.json").read_text())["env_steps"] == 40  # the old end's
    copy = _rel_copy(run_dir, tmp_path / "copy")  # run_dir's lock stays held by this process's resume
    with pytest.raises(agent_lib.ConfigError, match="has done 3 epochs: --epochs 1 cannot undo them"):
        train.resume_run(copy, {"epochs": 1})


def test_rel_an_edited_config_json_is_rewritten_from_the_checkpoint(rel_finished_run, tmp_path, capsys):
    run_dir = _rel_copy(rel_finished_run, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "learning_rate": 0.5}))
    capsys.readouterr()
    assert run_main(train.main, "--resume", str(run_dir)) is None
    assert "warning: config.json differs from checkpoint.pt's config (learning_rate 0.5 instead of 0.001)" in (
        capsys.readouterr().err
    )
    assert json.loads((run_dir / "config.json").read_text()) == config


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask 022", "umask 027"])
def test_rel_checkpoints_and_replay_files_follow_the_umask(tmp_path, umask, mode):
    from replay import atomic_save

    old = os.umask(umask)
    try:
        atomic_save({"epoch": 1}, tmp_path / "checkpoint.pt")
        atomic_save({"epoch": 2}, tmp_path / "checkpoint.pt", previous=tmp_path / "checkpoint.prev.pt")
        _filled_buffer([5]).save(tmp_path / "replay")
    finally:
        os.umask(old)
    files = [tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt", *(tmp_path / "replay").iterdir()]
    assert [f.stat().st_mode & 0o777 for f in files] == [mode] * 3
    assert _rel_epoch(tmp_path / "checkpoint.prev.pt") == 1


def test_rel_argument_errors_are_one_line(capsys):
    import bench
    import learn

    proc = run_script("train.py", "--epochs", "many")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("train.py: error: argument --epochs: ") and proc.stderr.endswith(" (see --help)\n")
    for parse in (play.parse_args, learn.parse_args, bench.parse_bench_args, evaluate.parse_args, sweep.parse_args):
        with pytest.raises(SystemExit):
            parse(["--bogus"])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ": error: " in err and err.endswith(" (see --help)\n"), err


def test_rel_collection_epochs_cannot_exceed_epochs():
    config = train.parse_args(["--preset", "tiny", "--epochs", "4"])[0]
    assert config.collection_epochs == 4  # --epochs alone shortens the collection with it
    config = train.parse_args(["--preset", "tiny", "--epochs", "4", "--collection_epochs", "6"])[0]
    with pytest.raises(agent_lib.ConfigError, match="collection_epochs = 6 is more than epochs = 4"):
        agent_lib.validate_config(config)


def test_rel_progress_bars_stay_out_of_logs(capfd):
    run_episodes(CATCH_ID, lambda obs, first: np.zeros(len(obs), dtype=np.int64), 2, num_envs=1, seed=0)
    assert "\r" not in capfd.readouterr().err  # stderr is a file here, as in `python train.py 2> log`


def test_rel_the_paper_config_on_a_cpu_warns_of_its_length():
    paper = agent_lib.IRISConfig()
    # 595, 575, 550 epochs of 200 steps at 70, 25, 174 s per step: 30.3M s.
    assert "about 351 days" in agent_lib.cpu_time_warning(paper, torch.device("cpu"))
    assert agent_lib.cpu_time_warning(paper, torch.device("cuda")) is None
    assert agent_lib.cpu_time_warning(train.parse_args(["--preset", "tiny"])[0], torch.device("cpu")) is None
