"""Watch a trained agent, and play inside its dream: the world model of Section 2 as a game, as in Figure 4.

    python play.py RUN_DIR                        # the real game x_t beside the agent's view x̂_t = D(E(x_t)) (2.1)
    python play.py RUN_DIR --dream                # the agent acts inside its world model (imagination, 2.2-2.3)
    python play.py RUN_DIR --human                # you act inside the world model: arrow keys and space
    python play.py RUN_DIR --dream --record dream.mp4 --steps 300    # headless: an MP4 or a GIF, no window

Under the frames: the policy's probabilities π(a | x̂_≤t) at the sampling temperature, the value V(x̂_t) and the
episode's return so far. A dream starts from a real frame x_0 (from the run's dataset replay/ if there is one, else from
a real env after a reset and a few random steps); the LSTM state is burnt in on the real frames before x_0
(Appendix A.3), then G samples r̂_t, d̂_t and ẑ_{t+1} (Section 2.2). As in Figure 4, a yellow box marks a predicted
positive reward and a red box a predicted end. After a predicted end, or --horizon steps, the dream starts over
from a new real frame. Recording uses no display and no pygame; the window shows the very same images.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from agent import FIGURE4_END, FIGURE4_REWARD, Agent, CLIParser, check_checkpoint, load_checkpoint, pick_device
from agent import setup_process, write_video
from env import NOOP, make_env
from replay import ReplayBuffer
from world_model import WorldModelEnv

SCALE = 5  # each 64x64 frame is drawn 5 times larger
PANEL = 64 * SCALE  # 320 pixels: one square panel per frame
BORDER = 8  # Figure 4's coloured boxes, in pixels
TEXT_HEIGHT = 176  # a status line, π's bars, then up to 5 lines of keys
WIDTH, HEIGHT = 2 * PANEL, PANEL + TEXT_HEIGHT  # (640, 496): even sides, as MP4 wants
BAR_TOP, BAR_HEIGHT = PANEL + 28, 40  # π's bars, under the status line
LINES_TOP, LINE_HEIGHT, LINE_CHARS = PANEL + 98, 17, 100  # the key lines, wrapped at 100 characters
FONT, FONT_SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.42
WHITE, GREY, DARK, BAR = (255, 255, 255), (150, 150, 150), (40, 40, 40), (90, 160, 255)
FPS = 15  # agent steps per second: real time for Atari at frame skip 4 (60 / 4)
SPEEDS = (1, 2, 5, 10, 15, 30, 60)  # steps per second that [ and ] step through
TEMPERATURE_STEP = 0.1  # what - and = take off or add to τ
START_STEPS = 30  # a dream from a real env starts 0 to 30 random steps after a reset
DIRECTIONS = ("UP", "DOWN", "LEFT", "RIGHT", "FIRE")  # the words of ale-py's action meanings
KEY_NAMES = {"UP": "Up", "DOWN": "Down", "LEFT": "Left", "RIGHT": "Right", "FIRE": "Space"}
CONTROLS = "P pause | N one step | [ ] slower/faster | - = colder/hotter | R restart | Q quit"


class PlayError(ValueError):
    """A request play.py cannot serve, with a message that says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Keys: ale-py's action meanings (UPRIGHTFIRE...) as arrow keys and space


def key_mapping(meanings: list[str], game: str = "this game") -> dict[frozenset[str], int]:
    """{directions pressed: action}, from ale-py's action meanings: 'UPRIGHTFIRE' is Up + Right + Space."""
    mapping, unknown = {}, []
    for action, meaning in enumerate(meanings):
        match = re.fullmatch(r"(UP|DOWN)?(RIGHT|LEFT)?(FIRE)?", meaning)
        if meaning == "NOOP":
            mapping[frozenset()] = action
        elif match and meaning:
            mapping[frozenset(part for part in match.groups() if part)] = action
        else:
            unknown.append(meaning)
    if unknown:
        raise PlayError(
            f"no keys for {game}'s actions {', '.join(unknown)}: --human maps only NOOP and "
            f"{', '.join(DIRECTIONS)} and their combinations; watch it or use --dream instead"
        )
    return mapping


def action_for(pressed: set[str], mapping: dict[frozenset[str], int]) -> int:
    """The action of the keys pressed; else of the most of them that form an action, moving rather than firing on a
    tie (Right + Space in Breakout, which has no RIGHTFIRE, is RIGHT); NOOP when none is pressed."""
    best = max(
        ((len(keys), "FIRE" not in keys, -action) for keys, action in mapping.items() if keys <= pressed),
        default=(0, True, -NOOP),
    )
    return -best[2]


def mapping_text(mapping: dict[frozenset[str], int], meanings: list[str]) -> str:
    names = {action: "+".join(KEY_NAMES[d] for d in DIRECTIONS if d in keys) for keys, action in mapping.items()}
    return "  ".join(f"{names[a]}={meanings[a]}" for a in sorted(names) if names[a])


# ---------------------------------------------------------------------------------------------------------------
# What the agent does: π and V on x̂, the real game, the dream


@dataclass
class View:
    """What one frame of the window (or of a recording) shows."""

    real: np.ndarray  # the real frame (h, w, 3) uint8: the screen now, or x_0 where the dream started
    seen: np.ndarray  # x̂_t (64, 64, 3) uint8: D(E(x_t)), or the imagined frame
    probs: np.ndarray  # π(a | x̂_≤t) at the current temperature, (A,)
    value: float  # V(x̂_t)
    ret: float  # the episode's return so far; in a dream, the sum of the predicted rewards
    step: int  # steps since the episode (or the dream) started
    reward: float | None = None  # r̂ predicted on the step into x̂_t (dreams)
    end: bool = False  # d̂ predicted on the step into x̂_t (dreams)


class Policy:
    """π and V on x̂ with their own LSTM state and their own random stream: torch's stays the world model's."""

    def __init__(self, agent: Agent, temperature: float, seed: int) -> None:
        self.agent, self.temperature = agent, temperature
        self.generator = torch.Generator(agent.device).manual_seed(seed)
        self.reset()

    def reset(self, state: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.state = state if state is not None else self.agent.actor_critic.initial_state(1, self.agent.device)

    def look(self, frame: torch.Tensor) -> None:
        """Step the LSTM on x̂_t (1, 3, 64, 64) in [0, 1]."""
        logits, value, self.state = self.agent.actor_critic(frame, self.state)
        self.logits, self.value = logits[0].float(), float(value[0])  # (A,), V(x̂_t)

    def probs(self) -> torch.Tensor:
        if self.temperature == 0:  # argmax, as Agent.act at temperature 0
            return torch.nn.functional.one_hot(self.logits.argmax(), len(self.logits)).float()
        return torch.softmax(self.logits / self.temperature, dim=-1)  # (A,)

    def sample(self) -> int:
        # Differs from Agent.act (Gumbel-max on torch's stream): the same distribution, drawn from our own generator,
        # so that a dream's frames depend only on its actions and the seed (test_play_dream_frames_equal_...).
        return int(torch.multinomial(self.probs(), 1, generator=self.generator))


def to_image(frame: torch.Tensor) -> np.ndarray:
    """(1, 3, 64, 64) float in [0, 1] or uint8 -> (64, 64, 3) uint8."""
    frame = frame[0] if frame.dtype == torch.uint8 else frame[0].float().mul(255).round().to(torch.uint8)
    return frame.permute(1, 2, 0).cpu().numpy()


class Watch:
    """The real test env (Section 3.2): the agent acts on x̂_t = D(E(x_t)) with its policy π."""

    def __init__(self, agent: Agent, game: str, policy: Policy, seed: int) -> None:
        self.agent, self.policy = agent, policy
        self.env = make_env(game, train=False, seed=seed, config=agent.config.env)
        self.restart()

    @torch.no_grad()
    def restart(self) -> None:
        self.obs, _ = self.env.reset()  # x_0, (64, 64, 3) uint8
        self.ret, self.steps = 0.0, 0
        self.policy.reset()
        self._look()

    def _look(self) -> None:
        frame = torch.as_tensor(self.obs, device=self.agent.device).permute(2, 0, 1)[None]  # (1, 3, 64, 64)
        with self.agent.autocast():
            self.seen = self.agent.tokenizer.encode_decode(frame)  # x̂_t, (1, 3, 64, 64)
            self.policy.look(self.seen)

    def view(self) -> View:
        screen = self.env.unwrapped.ale.getScreenRGB()  # (210, 160, 3): the full screen is more readable than x_t
        return View(
            screen, to_image(self.seen), self.policy.probs().cpu().numpy(), self.policy.value, self.ret, self.steps
        )

    @torch.no_grad()
    def advance(self, action: int | None = None) -> int:
        action = self.policy.sample() if action is None else action
        self.obs, reward, terminated, truncated, _ = self.env.step(action)
        self.ret, self.steps = self.ret + float(reward), self.steps + 1
        if terminated or truncated:
            self.restart()
        else:
            self._look()
        return action


class StartFrames:
    """Real segments of burn_in + 1 frames whose last one is x_0: from the run's dataset, else from a real env."""

    def __init__(self, agent: Agent, game: str, run_dir: Path, seed: int) -> None:
        self.length, self.device = agent.config.actor_critic.burn_in + 1, agent.device
        self.rng = np.random.default_rng(seed)
        path = run_dir / "replay"  # the dataset train.py writes beside checkpoint.pt
        self.replay = ReplayBuffer.load(path) if path.is_dir() else None
        self.env = None if self.replay is not None else make_env(game, seed=seed, config=agent.config.env)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (burn_in + 1, 3, 64, 64) uint8 and mask (burn_in + 1,) bool, False on left padding."""
        if self.replay is not None:
            with torch.random.fork_rng(devices=[]):  # leave torch's random stream to the world model
                torch.manual_seed(int(self.rng.integers(2**31)))
                batch = self.replay.sample(1, self.length, sample_from_start=False)
            return batch["observations"][0].to(self.device), batch["mask"][0].to(self.device)
        obs, _ = self.env.reset()
        frames = [obs]
        for _ in range(self.rng.integers(START_STEPS + 1)):
            obs, _, terminated, truncated, _ = self.env.step(int(self.rng.integers(self.env.action_space.n)))
            if terminated or truncated:
                obs, frames = self.env.reset()[0], []
            frames.append(obs)
        frames = frames[-self.length :]
        padded = np.zeros((self.length, *frames[0].shape), dtype=np.uint8)  # (burn_in + 1, 64, 64, 3)
        padded[self.length - len(frames) :] = np.stack(frames)
        mask = torch.arange(self.length, device=self.device) >= self.length - len(frames)
        return torch.as_tensor(padded, device=self.device).permute(0, 3, 1, 2), mask  # (burn_in + 1, 3, 64, 64)


class Dream:
    """The world model as the environment (Section 2.3): x̂_0 = D(E(x_0)), then r̂_t, d̂_t, x̂_{t+1} ~ G(z, a)."""

    def __init__(self, agent: Agent, starts: StartFrames, policy: Policy, horizon: int) -> None:
        self.agent, self.starts, self.policy, self.horizon = agent, starts, policy, horizon
        self.wm_env = WorldModelEnv(agent.tokenizer, agent.world_model)
        self.restart()

    @torch.no_grad()
    def restart(self) -> None:
        frames, mask = self.starts.next()  # (burn_in + 1, 3, 64, 64) uint8, (burn_in + 1,)
        self.start = frames[-1:]  # x_0, (1, 3, 64, 64) uint8
        with self.agent.autocast():
            state = None
            if mask[:-1].any():  # the policy sees the burn-in frames reconstructed, as in imagine()
                views = self.agent.tokenizer.encode_decode(frames[None, :-1])  # (1, burn_in, 3, 64, 64)
                state = self.agent.actor_critic.burn_in(views, mask[None, :-1])
            self.policy.reset(state)
            self.frame = self.wm_env.reset(self.start)  # x̂_0, (1, 3, 64, 64)
            self.policy.look(self.frame)
        self.ret, self.steps, self.reward, self.end = 0.0, 0, None, False

    def view(self) -> View:
        return View(
            to_image(self.start),
            to_image(self.frame),
            self.policy.probs().cpu().numpy(),
            self.policy.value,
            self.ret,
            self.steps,
            self.reward,
            self.end,
        )

    @torch.no_grad()
    def advance(self, action: int | None = None) -> int | None:
        """One imagined step; None when the dream ended (d̂ = 1 or the horizon) and starts over instead."""
        if self.end or self.steps >= self.horizon:
            self.restart()
            return None
        action = self.policy.sample() if action is None else action
        with self.agent.autocast():
            reward, end, self.frame = self.wm_env.step(torch.tensor([action]))  # r̂_t, d̂_t, x̂_{t+1}
            self.policy.look(self.frame)
        self.reward, self.end = float(reward[0]), bool(end[0])
        self.ret, self.steps = self.ret + self.reward, self.steps + 1
        return action


# ---------------------------------------------------------------------------------------------------------------
# Drawing, with OpenCV on numpy images: the window shows the very images a recording writes


def put_text(image: np.ndarray, text: str, x: int, y: int, color=WHITE, scale: float = FONT_SCALE) -> None:
    (width, height), below = cv2.getTextSize(text, FONT, scale, 1)
    image[max(y - height - 2, 0) : y + below, x - 2 : x + width + 2] = 0  # a black box: readable on any frame
    cv2.putText(image, text, (x, y), FONT, scale, color, 1, cv2.LINE_AA)


class Screen:
    """One image per step: the real frame beside x̂ (with Figure 4's boxes), π's bars, the status and key lines."""

    def __init__(self, mode: str, game: str, meanings: list[str], keys: str = "") -> None:
        short = {"UP": "U", "DOWN": "D", "LEFT": "L", "RIGHT": "R", "FIRE": "F"}  # 18 labels must fit 640 pixels
        self.labels = [m if len(meanings) <= 8 else re.sub("|".join(short), lambda x: short[x[0]], m) for m in meanings]
        self.mode, self.game = mode, game
        self.lines = textwrap.wrap(f"keys: {keys}", LINE_CHARS) + [CONTROLS] if keys else [CONTROLS]
        self.captions = (
            ("real frame", "agent's view D(E(x))")
            if mode == "watch"
            else ("real frame the dream started from", "imagined frame")
        )

    def draw(self, view: View, temperature: float, speed: float) -> np.ndarray:
        """(HEIGHT, WIDTH, 3) uint8 RGB."""
        image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
        # Figure 4's box; an end above a reward
        box = FIGURE4_END if view.end else FIGURE4_REWARD if (view.reward or 0) > 0 else DARK
        inner = PANEL - 2 * BORDER
        for left, frame, color, caption in (
            (0, view.real, DARK, self.captions[0]),
            (PANEL, view.seen, box, self.captions[1]),
        ):
            image[:PANEL, left : left + PANEL] = color
            image[BORDER : PANEL - BORDER, left + BORDER : left + PANEL - BORDER] = cv2.resize(
                frame, (inner, inner), interpolation=cv2.INTER_NEAREST
            )  # (inner, inner, 3)
            put_text(image, caption, left + BORDER + 4, BORDER + 16)
        status = f"{self.mode} {self.game} | step {view.step} | return {view.ret:g} | V {view.value:.3f}"
        if view.reward is not None:
            status += f" | reward {view.reward:+g} | end {int(view.end)}"
        put_text(image, status + f" | temperature {temperature:.2f} | {speed:g} steps/s", 6, PANEL + 18)
        cell = WIDTH // len(view.probs)
        for action, (prob, label) in enumerate(zip(view.probs, self.labels)):  # π(a | x̂_≤t), one bar per action
            x, top = action * cell, BAR_TOP + round((1 - float(prob)) * BAR_HEIGHT)
            cv2.rectangle(image, (x + 2, top), (x + cell - 3, BAR_TOP + BAR_HEIGHT), BAR, -1)
            put_text(image, label, x + 2, BAR_TOP + BAR_HEIGHT + 13, GREY, 0.32)
        for i, line in enumerate(self.lines):
            put_text(image, line, 6, LINES_TOP + i * LINE_HEIGHT, GREY)
        return image


# ---------------------------------------------------------------------------------------------------------------
# Window and recording


def record(player: Watch | Dream, screen: Screen, path: Path, steps: int, fps: float) -> Path:
    """steps images (the first before any step), written as an MP4 or a GIF by path's extension; no display."""
    images = [screen.draw(player.view(), player.policy.temperature, fps)]
    for _ in range(steps - 1):
        player.advance()
        images.append(screen.draw(player.view(), player.policy.temperature, fps))
    return write_video(np.stack(images), path, fps)  # (steps, HEIGHT, WIDTH, 3)


def has_display() -> bool:
    if not sys.platform.startswith("linux") or os.environ.get("SDL_VIDEODRIVER"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def run_window(
    player: Watch | Dream, screen: Screen, fps: float, mapping: dict[frozenset[str], int] | None = None
) -> int:
    """The pygame window until Q, Esc or closing it; with a mapping, the human acts. Returns the images shown."""
    try:
        import pygame
    except ImportError as error:
        raise PlayError(
            "the window needs pygame (pip install -r requirements.txt); or record: --record play.mp4"
        ) from error
    held_keys = {
        pygame.K_UP: "UP",
        pygame.K_DOWN: "DOWN",
        pygame.K_LEFT: "LEFT",
        pygame.K_RIGHT: "RIGHT",
        pygame.K_SPACE: "FIRE",
    }
    speed_keys = {pygame.K_LEFTBRACKET: -1, pygame.K_RIGHTBRACKET: 1}
    temperature_keys = {pygame.K_MINUS: -1, pygame.K_EQUALS: 1}
    pygame.display.init()  # not pygame.init(): no audio device is needed (or opened)
    try:
        window = pygame.display.set_mode((WIDTH, HEIGHT))
    except pygame.error as error:
        raise PlayError(f"no display to open a window on ({error}); record headless: --record play.mp4") from error
    pygame.display.set_caption(f"iris play.py: {CONTROLS}")
    clock, paused, shown = pygame.time.Clock(), False, 0
    while True:
        step_once = False
        for event in pygame.event.get():
            key = event.key if event.type == pygame.KEYDOWN else None
            if event.type == pygame.QUIT or key in (pygame.K_q, pygame.K_ESCAPE):
                pygame.quit()
                return shown
            paused, step_once = paused != (key == pygame.K_p), step_once or key == pygame.K_n
            if key in speed_keys:  # the next of SPEEDS, from the nearest one
                nearest = SPEEDS.index(min(SPEEDS, key=lambda s: abs(s - fps)))
                fps = SPEEDS[min(max(nearest + speed_keys[key], 0), len(SPEEDS) - 1)]
            if key in temperature_keys:
                change = TEMPERATURE_STEP * temperature_keys[key]
                player.policy.temperature = round(max(0.0, player.policy.temperature + change), 2)
            if key == pygame.K_r:
                player.restart()
        if not paused or step_once:
            held = pygame.key.get_pressed()  # the human's action: the arrows and space held down now
            pressed = {direction for key, direction in held_keys.items() if held[key]}
            player.advance(None if mapping is None else action_for(pressed, mapping))
        image = screen.draw(player.view(), player.policy.temperature, fps)  # (HEIGHT, WIDTH, 3)
        window.blit(pygame.surfarray.make_surface(image.transpose(1, 0, 2)), (0, 0))  # pygame wants (W, H, 3)
        pygame.display.flip()
        shown += 1
        clock.tick(fps)


def make_player(agent: Agent, mode: str, run_dir: Path, seed: int, temperature: float, horizon: int) -> Watch | Dream:
    """The real game (mode "watch") or the dream ("dream", "human"); torch's random stream is seeded here."""
    torch.manual_seed(seed)  # the world model's draws
    policy = Policy(agent, temperature, seed)
    if mode == "watch":
        return Watch(agent, agent.config.game, policy, seed)
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent  # a checkpoint file: its replay/ is beside it
    return Dream(agent, StartFrames(agent, agent.config.game, run_dir, seed), policy, horizon)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CLIParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?", metavar="RUN_DIR", help="a run directory with checkpoint.pt")
    parser.add_argument("--authors_checkpoint", type=Path, metavar="GAME.pt", help="one of the authors' agents")
    parser.add_argument("--game", help="with --authors_checkpoint: its game (default: the file's name)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--dream", action="store_true", help="the agent acts inside its world model")
    group.add_argument("--human", action="store_true", help="you act inside the world model")
    parser.add_argument("--record", type=Path, metavar="FILE", help="write FILE (.mp4 or .gif) headless, no window")
    parser.add_argument("--steps", type=int, default=300, help="images to record (default 300)")
    parser.add_argument("--temperature", type=float, help="π's sampling temperature (default: the eval one, 0.5)")
    parser.add_argument("--horizon", type=int, help="dream steps before starting over (default: H of Table 6)")
    parser.add_argument("--fps", type=float, default=FPS, help=f"steps per second (default {FPS}: real time)")
    parser.add_argument("--seed", type=int, default=0, help="env, policy and world-model draws")
    parser.add_argument("--device", default="auto", help="auto: cuda, then mps, then cpu")
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (args.authors_checkpoint is None):
        parser.error("give a run directory, or --authors_checkpoint GAME.pt (one of the two)")
    if args.run_dir is None:
        args.run_dir = args.authors_checkpoint
    if args.record is not None and args.human:
        parser.error("--human needs you at the keyboard; record the agent instead (drop --human, or use --dream)")
    if args.record is not None and args.record.suffix.lower() not in (".mp4", ".gif"):
        parser.error(f"--record writes .mp4 or .gif, by the file's extension; got {args.record.name}")
    if args.record is None and not has_display():
        parser.error(
            "no display available (DISPLAY and WAYLAND_DISPLAY are unset) to open a window; record a "
            f"video headless instead: python play.py {args.run_dir} --record play.mp4 --steps 300"
        )
    if min(args.steps, 1 if args.horizon is None else args.horizon) < 1 or args.fps <= 0 or (args.temperature or 0) < 0:
        parser.error("--steps and --horizon must be at least 1, --fps above 0 and --temperature at least 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mode = "human" if args.human else "dream" if args.dream else "watch"
    try:
        if args.authors_checkpoint is not None:
            agent = Agent.from_authors_checkpoint(args.authors_checkpoint, args.game, pick_device(args.device))
            checkpoint = {"game": agent.config.game, "num_actions": agent.num_actions}
        else:
            checkpoint = load_checkpoint(args.run_dir)  # says what to do when there is no checkpoint
            agent = Agent.from_checkpoint(checkpoint, pick_device(args.device))
        setup_process(agent.config, agent.device)
        env = make_env(agent.config.game, train=False)
        meanings = env.unwrapped.get_action_meanings()
        env.close()
        check_checkpoint(checkpoint, args.run_dir, num_actions=len(meanings))  # its action set is this game's
        mapping = key_mapping(meanings, agent.config.game) if args.human else None
        temperature = agent.config.eval_temperature if args.temperature is None else args.temperature
        horizon = args.horizon or agent.config.actor_critic.imagination_horizon
        player = make_player(agent, mode, args.run_dir, args.seed, temperature, horizon)
        screen = Screen(mode, agent.config.game, meanings, mapping_text(mapping, meanings) if mapping else "")
        if args.record is not None:
            print(f"wrote {record(player, screen, args.record, args.steps, args.fps)}")
        else:
            run_window(player, screen, args.fps, mapping)
    except (FileNotFoundError, ValueError, OSError) as error:  # PlayError and CheckpointError are ValueErrors
        sys.exit(f"play.py: error: {error}")


if __name__ == "__main__":
    main()
