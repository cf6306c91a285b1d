"""Real Atari environments under the Atari 100k protocol (Section 3.1; evaluation protocol of Section 3.2).

The paper does not spell the protocol out; its numbers come from the authors' code (eloialonso/iris,
config/env/default.yaml), which follows Machado et al. (2018) without sticky actions: minimal action set,
frame skip 4 with a max over the last two frames, 1 to 30 no-ops after each reset, 64x64 RGB frames.
Training episodes end when a life is lost, but the game itself goes on ("episodic life"); test episodes
are whole games of at most 108,000 frames. gymnasium's AtariPreprocessing and TimeLimit do the work; the
only wrapper written here is EpisodicLife, which AtariPreprocessing cannot do (it restarts the game).

Any other registered gymnasium environment whose observations are RGB frames (H, W, 3) uint8 also works (e.g. the
test suite's catch game): its frames are resized to 64x64 and its episodes capped at max_train_frames or
max_test_frames steps; none of the Atari protocol applies to it.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable

import ale_py
import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from gymnasium.wrappers import AtariPreprocessing, ResizeObservation
from tqdm import tqdm

gym.register_envs(ale_py)


@dataclass
class EnvConfig:
    """The Atari 100k protocol. Only the frame size is in the paper; the rest is the reference code's."""

    frame_size: int = 64  # h = w = 64, Table 2
    frame_skip: int = 4  # each action repeated 4 frames, max over the last 2 (reference: env.frame_skip)
    noop_max: int = 30  # 1 to 30 no-ops after a training env's reset (reference: env.train.noop_max)
    # Differs from the reference code: its test env takes exactly 1 no-op (env.test.noop_max = 1, test_noop_max 1
    # here); the default takes 1 to 30, as the usual Atari 100k evaluation protocol (Machado et al., 2018).
    test_noop_max: int = 30  # 1 to test_noop_max no-ops after a test env's reset
    repeat_action_probability: float = 0.0  # no sticky actions (reference: NoFrameskip-v4 games)
    max_train_frames: int = 20_000  # 5,000 agent steps (reference: env.train.max_episode_steps)
    max_test_frames: int = 108_000  # 27,000 agent steps, 30 minutes of play (reference: env.test)


ENV_DEFAULTS = EnvConfig()

# The 26 games of Atari 100k (Kaiser et al., 2020), Table 1.
# fmt: off
ATARI_100K_GAMES: tuple[str, ...] = (
    "Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing", "Breakout", "ChopperCommand",
    "CrazyClimber", "DemonAttack", "Freeway", "Frostbite", "Gopher", "Hero", "Jamesbond", "Kangaroo", "Krull",
    "KungFuMaster", "MsPacman", "Pong", "PrivateEye", "Qbert", "RoadRunner", "Seaquest", "UpNDown",
)
# fmt: on

NOOP = 0  # ALE's action 0 is NOOP in every minimal action set
ATARI_ENTRY_POINT = "ale_py.env:AtariEnv"


def _ale_games() -> dict[str, str]:
    """Every game ale-py registers, keyed by its lowercase name without separators ('kungfumaster')."""
    names = [m.group(1) for m in (re.fullmatch(r"ALE/([A-Za-z0-9]+)-v5", k) for k in gym.registry) if m]
    return {_key(name): name for name in names}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def is_atari(game: str) -> bool:
    """False for a registered gymnasium id of another environment than ale-py's; True otherwise.

    "module:EnvId" imports module first (gymnasium's convention), so that a module of the user's can register EnvId.
    """
    if ":" in game:
        module, game = game.split(":", 1)
        importlib.import_module(module)
    return game not in gym.registry or gym.registry[game].entry_point == ATARI_ENTRY_POINT


def canonical_game(game: str) -> str:
    """'Pong', 'pong', 'ALE/Pong-v5' and 'PongNoFrameskip-v4' all give 'Pong'; an unknown name is a ValueError.

    A registered gymnasium id of another environment ('CartPole-v1') is returned as it is.
    """
    if not is_atari(game.strip()):
        return game.strip()
    name = re.sub(r"^ALE/", "", game.strip())
    name = re.sub(r"-v\d+$", "", name)
    name = re.sub(r"(NoFrameskip|Deterministic)$", "", name)
    games = _ale_games()
    if _key(name) in games:
        return games[_key(name)]
    close = difflib.get_close_matches(_key(name), list(games), n=3, cutoff=0.5)
    if not close:  # still name something: the nearest three by similarity
        close = sorted(games, key=lambda k: -difflib.SequenceMatcher(None, _key(name), k).ratio())[:3]
    suggestions = ", ".join(games[k] for k in close)
    raise ValueError(
        f"unknown Atari game {game!r}; closest valid games: {suggestions} "
        f"(the 26 of Atari 100k are env.ATARI_100K_GAMES; or a registered gymnasium id)"
    )


class EpisodicLife(gym.Wrapper):
    """A lost life ends the learner's episode (terminated=True); the next reset() resumes the same game.

    Only a real game over (or the frame limit) restarts the game. As in the reference code (baselines'
    EpisodicLifeEnv), resuming takes one no-op step whose reward is dropped, and the last life's loss is
    left to the game over signal so that one game of n lives gives n learner episodes.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.lives = 0
        self.resume = False  # True after an episode that ended on a lost life and not on game over

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        lives = self.env.unwrapped.ale.lives()
        life_lost = 0 < lives < self.lives
        self.lives = lives
        self.resume = life_lost and not (terminated or truncated)
        info["game_over"] = terminated
        return obs, reward, terminated or life_lost, truncated, info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        if self.resume and seed is None:
            obs, _, terminated, truncated, info = self.env.step(NOOP)
            if terminated or truncated:  # the no-op itself ended the game: start a new one
                obs, info = self.env.reset(options=options)
        else:
            obs, info = self.env.reset(seed=seed, options=options)
        self.resume = False
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


def make_env(game: str, train: bool = True, seed: int | None = None, config: EnvConfig = ENV_DEFAULTS) -> gym.Env:
    """One Atari environment: obs (64, 64, 3) uint8, Discrete(A) over the minimal action set (or any other, below).

    train=True: a lost life ends the episode, the game goes on at the next reset(); at most 20,000 frames a game.
    train=False: whole games of at most 108,000 frames. With a seed, the env is reset once with it here, so its
    emulator and no-op draws are reproducible; later reset() calls need no seed.
    """
    max_frames = config.max_train_frames if train else config.max_test_frames
    if not is_atari(game.strip()):
        return make_other_env(game.strip(), max_frames, seed, config)
    # The cap counts emulator frames (no-ops included), below frame skipping, as the reference's TimeLimit does.
    env = gym.make(
        f"ALE/{canonical_game(game)}-v5",
        frameskip=1,
        full_action_space=False,
        repeat_action_probability=config.repeat_action_probability,
        max_episode_steps=max_frames,
        disable_env_checker=True,
    )
    # Differs from the reference code: it resizes each frame with PIL bilinear, then takes the max over the
    # last two 64x64 frames; AtariPreprocessing takes the max at full resolution, then resizes (cv2 INTER_AREA).
    noop_max = config.noop_max if train else config.test_noop_max
    env = AtariPreprocessing(
        env,
        noop_max=noop_max,
        frame_skip=config.frame_skip,
        screen_size=config.frame_size,
        terminal_on_life_loss=False,
        grayscale_obs=False,
    )
    if train:
        env = EpisodicLife(env)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def action_names(game: str, config: EnvConfig = ENV_DEFAULTS) -> list[str]:
    """The names of a game's actions, index by index: ALE's (NOOP, FIRE, UP, ...) or, for another env, "0", "1", ..."""
    env = make_env(game, train=False, config=config)
    names = env.unwrapped.get_action_meanings() if hasattr(env.unwrapped, "get_action_meanings") else None
    count = env.action_space.n
    env.close()
    return names or [str(action) for action in range(count)]


def make_other_env(env_id: str, max_steps: int, seed: int | None, config: EnvConfig) -> gym.Env:
    """A registered non-Atari env with RGB frames: resized to 64x64 (cv2 INTER_AREA), episodes capped at max_steps."""
    env = gym.make(env_id, max_episode_steps=max_steps)
    space = env.observation_space
    if not (
        isinstance(space, gym.spaces.Box) and len(space.shape) == 3 and space.shape[2] == 3 and space.dtype == np.uint8
    ):
        env.close()
        raise ValueError(
            f"{env_id}'s observations are {space}; iris needs RGB frames, a Box of shape (H, W, 3) "
            "and dtype uint8 (they are resized to 64x64)"
        )
    if not isinstance(env.action_space, gym.spaces.Discrete):
        env.close()
        raise ValueError(f"{env_id}'s actions are {env.action_space}; iris needs a Discrete action space")
    size = (config.frame_size, config.frame_size)
    if space.shape[:2] != size:
        env = ResizeObservation(env, size)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def make_vector_env(
    game: str, num_envs: int, train: bool = False, seed: int | None = None, config: EnvConfig = ENV_DEFAULTS
) -> gym.vector.VectorEnv:
    """num_envs copies of make_env (env i seeded with seed + i), in worker processes when num_envs > 1.

    Autoreset mode SAME_STEP: the step that ends an episode returns its reward and done flag together with the
    first observation of the next episode (the last one is in info["final_obs"]), so no step is lost or doubled.
    """
    fns = [
        functools.partial(make_env, game, train, None if seed is None else seed + i, config) for i in range(num_envs)
    ]
    if num_envs > 1:
        return AsyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)
    return SyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)


Policy = Callable[[np.ndarray, np.ndarray], np.ndarray]
StepHook = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


def run_episodes(
    game: str,
    policy: Policy,
    num_episodes: int,
    num_envs: int = 8,
    seed: int | None = None,
    train: bool = False,
    config: EnvConfig = ENV_DEFAULTS,
    progress: bool = True,
    on_step: StepHook | None = None,
) -> list[float]:
    """Play num_episodes whole episodes in parallel envs; their undiscounted, unclipped returns in completion order.

    policy(obs (n, 64, 64, 3) uint8, first (n,) bool) -> actions (n,) int, where first[i] says env i has just
    begun an episode (a recurrent policy resets its state there). on_step(obs, actions, rewards, dones) sees
    every step of every env, including those of envs that have already played their share.
    Each env plays a fixed share of the episodes (num_episodes split evenly), not "whoever finishes first":
    that would favour short episodes and bias the mean return.
    """
    num_envs = max(1, min(num_envs, num_episodes))
    # Differs from the reference code: it plays episodes in rounds of num_envs (all envs wait for the slowest).
    quota = np.array([num_episodes // num_envs + (i < num_episodes % num_envs) for i in range(num_envs)])
    played = np.zeros(num_envs, dtype=np.int64)
    running_return = np.zeros(num_envs, dtype=np.float64)
    returns: list[float] = []
    envs = make_vector_env(game, num_envs, train=train, seed=seed, config=config)
    # disable=None: no bar when stderr is not a terminal, so that a log file gets no \r-updated lines
    bar = tqdm(
        total=num_episodes, desc=f"{canonical_game(game)} episodes", disable=None if progress else True, leave=False
    )
    try:
        obs, _ = envs.reset()
        first = np.ones(num_envs, dtype=bool)
        while len(returns) < num_episodes:
            actions = np.asarray(policy(obs, first)).reshape(num_envs)
            next_obs, rewards, terminated, truncated, _ = envs.step(actions)
            dones = np.logical_or(terminated, truncated)
            if on_step is not None:
                on_step(obs, actions, rewards, dones)
            running_return += rewards
            for i in np.flatnonzero(dones & (played < quota)):
                returns.append(float(running_return[i]))
                bar.update(1)
            played += dones
            running_return[dones] = 0.0
            obs, first = next_obs, dones
    finally:
        bar.close()
        envs.close()
    return returns
