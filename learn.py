"""Does it learn? The components of IRIS trained alone on real Atari frames, with held-out measurements.

    python learn.py tokenizer      # stage 1: E, D and the codebook (Section 2.1, Appendix A.1) on Pong frames
    python learn.py tokenizer --reconstruction_loss l2 --continuous_steps 3000 --steps 5000 --foreground_weight 20
                              --min_lr 1e-4  # Pong's tokens past the codebook's collapse (E and D alone first),
                                             # with the ball drawn (README "Does it learn?")
    python learn.py world_model    # stage 2: G (Section 2.2, Eqs. (1)-(3), Appendix A.2) on the stage-1 tokens
    python learn.py curve --runs runs/boxing_small_s0 [...]   # stage 3: train.py's runs (Algorithm 1) against
                                                            # a random policy: a table and a learning-curve PNG
    python learn.py run_world_model --runs runs/boxing_small_s0   # does a run's G generalise? a fresh G on the
                                                            # run's first steps, measured on its last 1,000
    python learn.py run_tokenizer --runs runs/boxing_small_s0     # how soon does E tell the run's frames apart?
    python learn.py baselines --games RoadRunner Boxing    # stage 3's choice of game: a random policy against
                                                            # each action held constant, under the test protocol
    python learn.py imagine --runs runs/crazyclimber_s0  # stage 3's diagnosis: the rewards that a run's G
                                                            # imagines for fixed action patterns, and the real ones

Data: a random policy (each action kept with probability ACTION_KEEP_PROB, so the paddle travels) plays the
training env of env.py (episodes end on game over in Pong, which has no lives); a second seed gives held-out
episodes that no model trains on. Everything goes to --out (default runs/learn/): the replay buffers, the
tokenizer checkpoint, the tokens of every frame, the world model, a PNG of originals above reconstructions
(Figure 4's top rows) and a GIF of imagination from a real frame (Section 2.3). Each stage prints a table of
held-out measurements every --eval_every steps (README "Does it learn?": results and times).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from agent import CHECKPOINT, Agent, CLIParser
from env import EnvConfig, action_names, make_env, run_episodes
from replay import ReplayBuffer, atomic_save, write_json
from tokenizer import RECONSTRUCTION_LOSSES, Tokenizer, TokenizerConfig, postprocess, token_usage
from train import FINAL_EVAL
from world_model import WorldModel, WorldModelConfig, WorldModelEnv

if TYPE_CHECKING:
    from PIL import Image

GAME = "Pong"
TRAIN_STEPS = 40_000  # real steps of the training data set
HELDOUT_STEPS = 10_000  # real steps of the held-out data set (other seed, other episodes)
WORLD_MODEL_TRAIN_STEPS = 20_000  # the first real steps of the training set that stage 2 encodes and trains on
HELDOUT_SEED_OFFSET = 1_000  # held-out env seed = --seed + this
ACTION_KEEP_PROB = 0.75  # random policy: repeat the previous action with this probability, else draw uniformly
RESTART_EVERY = 5  # steps between restarts of the codes no frame uses (tokenizer.restart_unused_codes); 0: none
RESTART_FRAMES = 64  # frames whose encoder outputs decide which codes are unused and where they restart
EVAL_FRAMES = 256  # held-out frames for the tokenizer's measurements
FOREGROUND_THRESHOLD = 0.1  # a pixel is foreground when a channel differs from the median frame by more (in [0, 1])
MEDIAN_FRAMES = 2_000  # training frames whose pixelwise median is the background
# Pong's field at 64x64 between the walls (rows) and between the paddles (columns): its foreground is the ball alone.
BALL_REGIONS = {"Pong": (slice(11, 58), slice(8, 56))}
BALL_COLUMNS = ("ball_l1", "ball_l1_median", "ball_drawn")  # ball_metrics' measures, NaN where there is no ball
PICTURE_FRAMES = 8  # columns of the reconstruction PNG
PICTURE_SCALE = 4  # nearest-neighbour upscaling of the pictures
EVAL_SEGMENTS = 256  # held-out segments for the world model's measurements
DREAM_STEPS = 40  # imagined steps in the GIF
DREAM_TRAJECTORIES = 4  # imagined trajectories side by side in the GIF
DREAM_STARTS = 64  # imagined trajectories whose ball is measured (the GIF shows the first DREAM_TRAJECTORIES)
DREAM_WINDOW = 10  # imagined steps per row of the dream's ball table
DREAM_STRIDE = 2  # imagined steps between the columns of the dream's PNG
GIF_MS = 100  # milliseconds per frame of the GIF
ENCODE_BATCH = 256  # frames per tokenizer call when encoding the data sets
MAX_GRAD_NORM = 10.0  # gradient clipping, Table 5
ADAM_BETAS = (0.9, 0.999)  # Adam β1, β2, Table 5
HELDOUT_RUN_STEPS = 1_000  # run_world_model: the last steps of a run's dataset, which the fresh G never sees
RANDOM_EPISODES = 32  # episodes of the random policy that stage 3's curve compares with
CONSTANT_EPISODES = 8  # baselines: episodes of each action held constant
BASELINE_FRAMES = 40_000  # baselines: frames a game at most (10,000 agent steps), so that a stuck action ends
NAN = float("nan")  # --continuous_steps: no codes to count
KMEANS_FRAMES = 1_024  # --continuous_steps: frames whose E outputs y^k the codebook's k-means runs on
KMEANS_ITERATIONS = 20  # --continuous_steps: Lloyd iterations of that k-means
Z_95 = 1.96  # 95% two-sided normal quantile
IMAGINE_STARTS = 256  # imagine: real frames of the run's dataset that the imagined trajectories start from
REAL_STEPS = 2_000  # imagine: steps of the real game (test protocol) per action pattern
RANDOM_PATTERN = "random"  # imagine: the uniformly random policy, beside the action patterns

# The sizes found to learn Pong on one CPU core (README "Does it learn?"); the paper's are in
# TokenizerConfig and WorldModelConfig. perceptual_weight 0: VGG16's ImageNet weights cannot be downloaded here.
TOKENIZER_SMALL = dict(
    ch=16,
    ch_mult=(1, 1, 1, 1, 1),
    num_res_blocks=1,
    attn_resolutions=(),
    z_channels=32,
    vocab_size=512,
    embed_dim=32,
    num_groups=8,
    perceptual_weight=0.0,
)
WORLD_MODEL_SMALL = dict(max_timesteps=8, embed_dim=64, num_layers=2, num_heads=4)


# ----------------------------------------------------------------------------------------------------------------------
# Data


def collect(game: str, num_steps: int, seed: int) -> ReplayBuffer:
    """num_steps real steps of the random policy in the training env (ends on game over / life loss)."""
    env = make_env(game, train=True, seed=seed)
    rng = np.random.default_rng(seed)
    buffer = ReplayBuffer(chunk_size=num_steps)
    obs, _ = env.reset()
    action = 0
    for _ in range(num_steps):
        if rng.random() > ACTION_KEEP_PROB:
            action = int(rng.integers(env.action_space.n))
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(obs, action, reward, terminated, truncated)
        obs = env.reset()[0] if terminated or truncated else next_obs
    env.close()
    return buffer


def load_data(out: Path, game: str, seed: int) -> tuple[ReplayBuffer, ReplayBuffer]:
    """The training and held-out buffers, collected once and then read from out/."""
    buffers = []
    for name, steps, env_seed in (("train", TRAIN_STEPS, seed), ("heldout", HELDOUT_STEPS, seed + HELDOUT_SEED_OFFSET)):
        path = out / f"replay_{name}.pt"
        if not path.exists():  # a ReplayBuffer is saved as a folder
            start = time.time()
            collect(game, steps, env_seed).save(path)
            print(f"collected {steps} {name} steps of {game} in {time.time() - start:.0f} s -> {path}")
        buffers.append(ReplayBuffer.load(path))
    for name, buffer in zip(("train", "heldout"), buffers):
        rewards, ends = buffer._data["rewards"][: len(buffer)], buffer._data["ends"][: len(buffer)]
        print(
            f"{name}: {len(buffer)} steps, {buffer.num_episodes} episodes, {int((rewards > 0).sum())} rewards +1, "
            f"{int((rewards < 0).sum())} rewards -1, {int(ends.sum())} ends"
        )
    return buffers[0], buffers[1]


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1: the tokenizer


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    return frames.float() / 255  # uint8 -> [0, 1]


def unquantized(tokenizer: Tokenizer, x: torch.Tensor) -> torch.Tensor:
    """--continuous_steps: D(E(x)) with y = E(x) straight into D, no codebook. x, result (B, 3, 64, 64) in [-1, 1]."""
    return tokenizer._decode_continuous(tokenizer._encode_continuous(x))


def cosine_lr(step: int, steps: int, lr: float, min_lr: float | None) -> float:
    """--min_lr: the learning rate at step of steps, from lr at step 0 down to min_lr at the last along a half cosine
    (as nanoGPT decays it, without warm-up); constant lr when min_lr is None (the paper, Table 2)."""
    if min_lr is None:
        return lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / max(steps, 1)))


def foreground(x: torch.Tensor, median: torch.Tensor) -> torch.Tensor:
    """Frames x (B, 3, 64, 64) in [0, 1], median frame (3, 64, 64) -> (B, 1, 64, 64) bool: the pixels that differ from
    the background (ball, paddles, score)."""
    return ((x - median).abs().amax(dim=1) > FOREGROUND_THRESHOLD).unsqueeze(1)


def pixel_weights(frames: torch.Tensor, median: torch.Tensor, foreground_weight: float) -> torch.Tensor | None:
    """--foreground_weight w: reconstruction weights (B, 1, 64, 64), 1 + w on foreground pixels and 1 elsewhere;
    None (the paper's unweighted term) for w = 0. Not the paper: without L_perceptual, Pong's ball (one or two pixels
    of 4,096) weighs too little in the mean for D to draw it (README "Does it learn?")."""
    return 1 + foreground_weight * foreground(to_unit(frames), median).float() if foreground_weight else None


def continuous_losses(
    tokenizer: Tokenizer, frames: torch.Tensor, weights: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """--continuous_steps: Appendix A.1's reconstruction term alone, on E and D without the codebook. Not the paper:
    a diagnosis (if E and D alone cannot keep the objects, the quantisation is not what loses them) and a warm-up."""
    x = tokenizer._preprocess(frames)  # (B, 3, 64, 64) in [-1, 1]
    return {"total": tokenizer.reconstruction_term(x - unquantized(tokenizer, x), weights)}


@torch.no_grad()
def reconstruct(
    tokenizer: Tokenizer, frames: torch.Tensor, continuous: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """frames (B, 3, 64, 64) uint8 -> tokens (B, K), D(E(x)) (B, 3, 64, 64) in [0, 1], in eval mode.
    continuous: no codebook (tokens None)."""
    was_training = tokenizer.training
    tokenizer.eval()
    if continuous:
        tokens = None
        chunks = [unquantized(tokenizer, tokenizer._preprocess(chunk)) for chunk in frames.split(ENCODE_BATCH)]
        images = postprocess(torch.cat(chunks)).clamp(0.0, 1.0)  # (B, 3, 64, 64)
    else:
        tokens = torch.cat([tokenizer.encode(chunk) for chunk in frames.split(ENCODE_BATCH)])  # (B, K)
        images = torch.cat([tokenizer.decode(chunk) for chunk in tokens.split(ENCODE_BATCH)])  # (B, 3, 64, 64)
    tokenizer.train(was_training)
    return tokens, images


def ball_metrics(
    x: torch.Tensor, x_hat: torch.Tensor, median: torch.Tensor, region: tuple[slice, slice] | None
) -> dict[str, float]:
    """The ball's pixels: the foreground of frames x (B, 3, 64, 64) in [0, 1] inside the game's BALL_REGIONS. Their
    L1 in x̂ against the median frame's (which draws no ball), and the share of the frames with a ball whose x̂ draws
    it: mean L1 on its pixels under half the median frame's. NaN for a game without a region or a ball in frames."""
    if region is None:
        return dict.fromkeys(BALL_COLUMNS, NAN)
    window = (slice(None), slice(None), *region)
    x, x_hat, median = x[window], x_hat[window], median[window[1:]]  # (B, 3, h, w), (3, h, w)
    ball = foreground(x, median)  # (B, 1, h, w)
    has_ball = ball.flatten(1).any(dim=1)  # (B,)
    if not has_ball.any():
        return dict.fromkeys(BALL_COLUMNS, NAN)
    pixels = ball.float().sum(dim=(1, 2, 3)).clamp(min=1) * 3  # (B,) ball elements per frame
    error = ((x - x_hat).abs() * ball).sum(dim=(1, 2, 3)) / pixels  # (B,) mean L1 of x̂ on the ball
    contrast = ((x - median).abs() * ball).sum(dim=(1, 2, 3)) / pixels  # (B,) the median frame's
    return {
        "ball_l1": error[has_ball].mean().item(),
        "ball_l1_median": contrast[has_ball].mean().item(),
        "ball_drawn": (error < contrast / 2)[has_ball].float().mean().item(),
    }


def tokenizer_metrics(
    tokenizer: Tokenizer,
    frames: torch.Tensor,
    median: torch.Tensor,
    continuous: bool = False,
    ball_region: tuple[slice, slice] | None = None,
) -> dict[str, float]:
    """Held-out frames (B, 3, 64, 64) uint8, median frame (3, 64, 64) in [0, 1] -> the stage-1 measurements
    (continuous: of D(E(x)) without the codebook, with no codes to count; ball_region: see ball_metrics)."""
    x = to_unit(frames)  # (B, 3, 64, 64)
    tokens, x_hat = reconstruct(tokenizer, frames, continuous)
    fg = foreground(x, median).expand_as(x)  # (B, 3, 64, 64)
    distances = torch.cdist(x.flatten(1), x_hat.flatten(1), p=1) / x[0].numel()  # (B, B) mean L1 of x_i to x̂_j
    same_frame = torch.cdist(x.flatten(1), x.flatten(1), p=1) == 0  # identical frames cannot be told apart
    pairs = ~same_frame  # ordered pairs (i, j) of different frames
    # Token discrimination: x̂_i strictly closer to x_i than x̂_j is; equal tokens (collapse) count as failures.
    closer = distances.diagonal().unsqueeze(1) < distances  # (B, B)
    return {
        "l1": (x - x_hat).abs().mean().item(),
        "fg_l1": (x - x_hat).abs()[fg].mean().item(),
        "fg_l1_median": (x - median).abs()[fg].mean().item(),
        "discrimination": closer[pairs].float().mean().item(),
        **ball_metrics(x, x_hat, median, ball_region),
        **(token_usage(tokens) if tokens is not None else {"codes_used": NAN, "distinct_frames": NAN}),
    }


def save_reconstructions(tokenizer: Tokenizer, frames: torch.Tensor, path: Path, continuous: bool = False) -> None:
    """PNG: held-out frames (top row) above D(E(x)) (bottom row)."""
    _, x_hat = reconstruct(tokenizer, frames, continuous)
    two_rows(to_unit(frames), x_hat).save(path)


def two_rows(top: torch.Tensor, bottom: torch.Tensor) -> Image.Image:
    """Frames (B, 3, 64, 64) in [0, 1]: top's above bottom's, side by side, upscaled PICTURE_SCALE times."""
    from PIL import Image

    grid = torch.stack([top, bottom])  # (2, B, 3, 64, 64)
    grid = grid.permute(0, 3, 1, 4, 2).flatten(2, 3).flatten(0, 1)  # (2*64, B*64, 3)
    grid = grid.repeat_interleave(PICTURE_SCALE, 0).repeat_interleave(PICTURE_SCALE, 1)
    return Image.fromarray(grid.clamp(0, 1).mul(255).round().to(torch.uint8).numpy())


def picture_frames(frames: torch.Tensor, median: torch.Tensor, count: int) -> torch.Tensor:
    """count of the held-out frames (B, 3, 64, 64) with the most foreground (ball in play), spread over them."""
    pixels = foreground(to_unit(frames), median).flatten(1).sum(1)  # (B,)
    stride = len(frames) // count
    picks = [i * stride + int(pixels[i * stride : (i + 1) * stride].argmax()) for i in range(count)]
    return frames[picks]


def train_tokenizer(args: argparse.Namespace) -> None:
    out = Path(args.out)
    train, heldout = load_data(out, args.game, args.seed)
    torch.manual_seed(args.seed)
    median = to_unit(train.observations[torch.randperm(len(train))[:MEDIAN_FRAMES]]).median(dim=0).values  # (3,64,64)
    eval_frames = heldout.observations[torch.randperm(len(heldout))[:EVAL_FRAMES]]  # (EVAL_FRAMES, 3, 64, 64)
    config = TokenizerConfig(
        **{
            **TOKENIZER_SMALL,
            "vocab_size": args.vocab_size,
            "embed_dim": args.embed_dim,
            "ch": args.ch,
            "z_channels": args.z_channels,
            "reconstruction_loss": args.reconstruction_loss,
        }
    )
    tokenizer = Tokenizer(config)
    print(f"tokenizer {config}")
    continuous = fit_tokenizer(tokenizer, train, eval_frames, median, args, out / "tokenizer_metrics.csv")
    atomic_save({"config": config.__dict__, "model": tokenizer.state_dict()}, out / "tokenizer.pt")
    picture = picture_frames(heldout.observations, median, PICTURE_FRAMES)
    save_reconstructions(tokenizer, picture, out / "reconstructions.png", continuous)
    if continuous:  # no codebook was trained: no tokens for stage 2
        print(f"saved {out / 'tokenizer.pt'}, {out / 'reconstructions.png'}")
        return
    train.truncate(WORLD_MODEL_TRAIN_STEPS)
    encode_buffers(tokenizer, {"train": train, "heldout": heldout}, out)
    print(f"saved {out / 'tokenizer.pt'}, {out / 'reconstructions.png'}, tokens in {out}/tokens_*.pt")


def fit_tokenizer(
    tokenizer: Tokenizer,
    train: ReplayBuffer,
    eval_frames: torch.Tensor,
    median: torch.Tensor,
    args: argparse.Namespace,
    path: Path,
) -> bool:
    """Stage 1's loop: Adam steps on frames drawn from train, with if asked foreground pixels weighted (against
    median), dead-code restarts and a cosine decay of the learning rate, and the held-out measurements every
    --eval_every steps, printed and written to path. Returns whether it ended before the codebook was used
    (--continuous_steps at least --steps, or --minutes up before them)."""
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=args.lr, betas=ADAM_BETAS)
    print(f"{sum(p.numel() for p in tokenizer.parameters()):,} parameters, batch {args.batch}, lr {args.lr}")
    columns = [
        "step",
        "minutes",
        "lr",
        "loss",
        "l1",
        "fg_l1",
        "fg_l1_median",
        "discrimination",
        *BALL_COLUMNS,
        "codes_used",
        "distinct_frames",
    ]
    table = Table(columns, path)
    start, loss = time.time(), float("nan")  # loss: the last training batch's (none before step 1)
    for step in range(args.steps + 1):
        last = step == args.steps or time.time() - start > args.minutes * 60
        continuous = step < args.continuous_steps or args.continuous_steps >= args.steps
        lr = cosine_lr(step, args.steps, args.lr, args.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if step == args.continuous_steps and not continuous and step:
            kmeans_codebook(tokenizer, train.sample_frames(KMEANS_FRAMES))
        if step % args.eval_every == 0 or last:
            table.row(
                {
                    "step": step,
                    "minutes": (time.time() - start) / 60,
                    "lr": lr,
                    "loss": loss,
                    **tokenizer_metrics(tokenizer, eval_frames, median, continuous, BALL_REGIONS.get(args.game)),
                }
            )
        if last:
            return continuous
        if args.restart_every and step % args.restart_every == 0 and step and not continuous:
            tokenizer.restart_unused_codes(train.sample_frames(RESTART_FRAMES))
        frames = train.sample_frames(args.batch)
        weights = pixel_weights(frames, median, args.foreground_weight)  # (B, 1, 64, 64) or None
        losses = continuous_losses(tokenizer, frames, weights) if continuous else tokenizer.loss(frames, weights)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        loss = losses["total"].item()
        torch.nn.utils.clip_grad_norm_(tokenizer.parameters(), MAX_GRAD_NORM)
        optimizer.step()


@torch.no_grad()
def kmeans_codebook(tokenizer: Tokenizer, frames: torch.Tensor) -> None:
    """--continuous_steps: the codebook {e_i} set to N k-means centroids of E's outputs y^k on frames, as Łańcucki
    et al. (2020) re-initialise codebooks, so that the switch to tokens starts where E's outputs are."""
    was_training = tokenizer.training
    tokenizer.eval()
    y = torch.cat([tokenizer._encode_continuous(tokenizer._preprocess(c)) for c in frames.split(ENCODE_BATCH)])
    tokenizer.train(was_training)
    y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])  # (B*K, d)
    n = tokenizer.config.vocab_size
    picks = torch.randperm(len(y))[:n] if len(y) >= n else torch.randint(len(y), (n,))  # fewer y than N: repeats
    centroids = y[picks].clone()  # (N, d)
    for _ in range(KMEANS_ITERATIONS):
        nearest = torch.cdist(y, centroids).argmin(dim=1)  # (B*K,)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, y)
        counts = torch.bincount(nearest, minlength=len(centroids)).unsqueeze(1)  # (N, 1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # an empty cluster keeps its point
    tokenizer.embedding.weight.copy_(centroids)


def encode_buffers(tokenizer: Tokenizer, buffers: dict[str, ReplayBuffer], out: Path) -> None:
    """z = E(x) of every stored frame, (len, K) int64, for stage 2."""
    for name, buffer in buffers.items():
        with torch.no_grad():
            tokens = torch.cat([tokenizer.eval().encode(chunk) for chunk in buffer.observations.split(ENCODE_BATCH)])
        atomic_save(tokens, out / f"tokens_{name}.pt")


def load_tokenizer(out: Path) -> Tokenizer:
    checkpoint = torch.load(out / "tokenizer.pt", weights_only=False)
    tokenizer = Tokenizer(TokenizerConfig(**checkpoint["config"]))
    tokenizer.load_state_dict(checkpoint["model"])
    return tokenizer.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Stage 2: the world model


def segment_batch(buffer: ReplayBuffer, tokens: torch.Tensor, batch_size: int, length: int) -> dict[str, torch.Tensor]:
    """B segments of T steps (Appendix A.2) with their tokens z_t (B, T, K) looked up from the encoded data set."""
    batch = buffer.sample(batch_size, length)
    batch["tokens"] = tokens[batch["index"]]  # (B, T, K)
    return batch


def fixed_segments(buffer: ReplayBuffer, tokens: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    """The held-out segments, the same at every evaluation: they tile each episode backwards from its last step,
    without overlap, so each real step is scored at most once and every episode end d_t = 1 is inside one."""
    starts, lengths = buffer._episode_table()
    index = torch.cat(
        [torch.arange(s + n - length, s - 1, -length) for s, n in zip(starts.tolist(), lengths.tolist()) if n >= length]
    )  # (S,) first step of each segment
    steps = index[:, None] + torch.arange(length)  # (S, T)
    data = {name: buffer._data[name][: len(buffer)][steps] for name in ("actions", "rewards", "ends")}
    data["ends"] = data["ends"].long()
    data["tokens"] = tokens[steps]  # (S, T, K)
    data["start"] = index  # (S,)
    data["mask"] = torch.ones_like(data["ends"], dtype=torch.bool)
    return data


def load_run(
    args: argparse.Namespace, stage: str, batch_field: str
) -> tuple[Path, Agent, ReplayBuffer, argparse.Namespace]:
    """The one train.py run of --runs: its directory, agent (last checkpoint, eval mode) and dataset, and args whose
    --batch and --lr default to the run's own (its `batch_field` and learning_rate)."""
    if len(args.runs) != 1:
        raise SystemExit(f"learn.py {stage}: give one train.py run directory with --runs DIR")
    run_dir = Path(args.runs[0])
    agent = Agent.load(run_dir / CHECKPOINT, device="cpu").eval()
    batch, lr = args.batch or getattr(agent.config, batch_field), args.lr or agent.config.learning_rate
    return (
        run_dir,
        agent,
        ReplayBuffer.load(run_dir / "replay"),
        argparse.Namespace(**{**vars(args), "batch": batch, "lr": lr, "game": agent.config.game}),
    )


def run_tokenizer(args: argparse.Namespace) -> None:
    """How soon does E tell a run's frames apart? A fresh tokenizer of a train.py run's config (batch and learning
    rate: the run's own), trained on the run's first steps and measured as in stage 1 on its last --heldout_steps,
    with the median of the training frames as background. In the loop, the actor-critic starts after
    (start_actor_critic_after_epochs - start_tokenizer_after_epochs) x training_steps_per_epoch tokenizer steps."""
    run_dir, agent, buffer, args = load_run(args, "run_tokenizer", "tokenizer_batch_size")
    config, split = agent.config, len(buffer) - args.heldout_steps
    if split < 1 or args.heldout_steps < 1:
        raise SystemExit(f"{run_dir}: {len(buffer)} steps cannot give --heldout_steps {args.heldout_steps} held out")
    torch.manual_seed(args.seed)
    eval_frames = buffer.observations[split:][torch.randperm(args.heldout_steps)[:EVAL_FRAMES]]  # (256, 3, 64, 64)
    buffer.truncate(split)
    frames = buffer.observations[torch.randperm(split)[:MEDIAN_FRAMES]]
    median = to_unit(frames).median(dim=0).values  # (3, 64, 64)
    own = tokenizer_metrics(agent.tokenizer, eval_frames, median, ball_region=BALL_REGIONS.get(args.game))
    print("the run's own E, on the held-out frames: " + ", ".join(f"{k} {v:.4g}" for k, v in own.items()))
    picture = Path(args.out) / "run_tokenizer_own.png"  # the run's own D(E(x)) under held-out frames
    save_reconstructions(agent.tokenizer, picture_frames(eval_frames, median, PICTURE_FRAMES), picture)
    tokenizer = Tokenizer(config.tokenizer)
    fit_tokenizer(tokenizer, buffer, eval_frames, median, args, Path(args.out) / "run_tokenizer_metrics.csv")


def run_world_model(args: argparse.Namespace) -> None:
    """Does G generalise? A fresh G of a train.py run's config, on the run's frozen tokens: trained on its dataset's
    first steps and measured on its last --heldout_steps, which it never sees (the run's own G trained on them)."""
    run_dir, agent, buffer, args = load_run(args, "run_world_model", "world_model_batch_size")
    config = agent.config.world_model
    if args.dropout is not None:  # the paper's 0.1 on all three (Table 4); the small preset has none
        config = replace(config, embed_dropout=args.dropout, attn_dropout=args.dropout, resid_dropout=args.dropout)
    split = len(buffer) - args.heldout_steps
    if split < config.max_timesteps or args.heldout_steps < config.max_timesteps:
        raise SystemExit(f"{run_dir}: {len(buffer)} steps cannot give --heldout_steps {args.heldout_steps} held out")
    with torch.no_grad():
        tokens = torch.cat([agent.tokenizer.encode(chunk) for chunk in buffer.observations.split(ENCODE_BATCH)])
    segments = fixed_segments(buffer, tokens, config.max_timesteps)
    heldout_data = {k: v[segments["start"] >= split] for k, v in segments.items()}
    own = world_model_metrics(agent.world_model, heldout_data)
    print("the run's own G, on the held-out segments: " + ", ".join(f"{k} {v:.3f}" for k, v in own.items()))
    buffer.truncate(split)
    torch.manual_seed(args.seed)
    tokenizer, wm = agent.config.tokenizer, agent.world_model
    model = WorldModel(config, tokenizer.vocab_size, wm.tokens_per_frame, agent.num_actions)
    fit_world_model(model, buffer, tokens, heldout_data, args, Path(args.out) / "run_world_model_metrics.csv")


@torch.no_grad()
def world_model_metrics(model: WorldModel, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Teacher-forced predictions on the held-out segments: argmax of each head."""
    was_training = model.training
    model.eval()
    K = model.tokens_per_frame
    correct, copy_correct, changed_correct, changed, total = 0, 0, 0, 0, 0
    reward_pred, reward_true, end_pred, end_true = [], [], [], []
    for chunk in range(0, len(data["tokens"]), EVAL_SEGMENTS):
        part = {k: v[chunk : chunk + EVAL_SEGMENTS] for k, v in data.items()}
        obs_tokens = part["tokens"]  # (B, T, K)
        B, T, _ = obs_tokens.shape
        hidden = model(torch.cat([obs_tokens, part["actions"].unsqueeze(-1)], -1).flatten(1))  # (B, T(K+1), D)
        hidden = hidden.view(B, T, K + 1, -1)  # (B, T, K+1, D)
        # Position k of step t (k = K is a_t) predicts frame token k+1 of step t+1 -> outputs K..2K-1 of the pair.
        frame_hidden = torch.cat([hidden[:, :-1, K:], hidden[:, 1:, : K - 1]], dim=2)  # (B, T-1, K, D)
        predicted = model.head_observations(frame_hidden).argmax(-1)  # (B, T-1, K)
        target, previous = obs_tokens[:, 1:], obs_tokens[:, :-1]  # (B, T-1, K)
        moving = target != previous
        correct += (predicted == target).sum().item()
        copy_correct += (previous == target).sum().item()
        changed_correct += (predicted == target)[moving].sum().item()
        changed += moving.sum().item()
        total += target.numel()
        reward_pred.append(model.head_rewards(hidden[:, :, K]).argmax(-1) - 1)  # (B, T) sign of r̂_t
        reward_true.append(torch.sign(part["rewards"]).long())
        end_pred.append(model.head_ends(hidden[:, :, K]).argmax(-1))
        end_true.append(part["ends"])
    model.train(was_training)
    metrics = {
        "token_acc": correct / total,
        "copy_acc": copy_correct / total,
        "changed_acc": changed_correct / max(changed, 1),
    }
    for name, pred, true in (("reward", reward_pred, reward_true), ("end", end_pred, end_true)):
        pred, true = torch.cat(pred).flatten(), torch.cat(true).flatten()
        hits = ((pred == true) & (true != 0)).sum().item()
        metrics[f"{name}_precision"] = hits / max((pred != 0).sum().item(), 1)
        metrics[f"{name}_recall"] = hits / max((true != 0).sum().item(), 1)
    return metrics


def train_world_model(args: argparse.Namespace) -> None:
    out = Path(args.out)
    train, heldout = load_data(out, args.game, args.seed)
    train.truncate(WORLD_MODEL_TRAIN_STEPS)
    tokenizer = load_tokenizer(out)
    tokens = {name: torch.load(out / f"tokens_{name}.pt") for name in ("train", "heldout")}  # (len, K) each
    torch.manual_seed(args.seed)
    config = WorldModelConfig(
        **{
            **WORLD_MODEL_SMALL,
            "embed_dim": args.wm_embed_dim,
            "num_layers": args.num_layers,
            "max_timesteps": args.timesteps,
        }
    )
    num_actions = int(train._data["actions"][: len(train)].max()) + 1
    model = WorldModel(config, tokenizer.config.vocab_size, tokenizer.config.tokens_per_frame, num_actions)
    heldout_data = fixed_segments(heldout, tokens["heldout"], config.max_timesteps)
    fit_world_model(model, train, tokens["train"], heldout_data, args, out / "world_model_metrics.csv")
    atomic_save({"config": config.__dict__, "model": model.state_dict()}, out / "world_model.pt")
    real, dreamed = dream(tokenizer, model, heldout, tokens["heldout"], args.seed)
    save_dream(real[:DREAM_TRAJECTORIES], dreamed[:DREAM_TRAJECTORIES], out / "dream.gif")
    region = BALL_REGIONS.get(args.game)
    if region is not None:
        frames = train.observations[torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))]
        median = to_unit(frames[:MEDIAN_FRAMES]).median(dim=0).values  # (3, 64, 64)
        dream_ball_table(real, dreamed, median, region, out / "dream_ball.csv")
    print(f"saved {out / 'world_model.pt'}, {out / 'dream.gif'}")


def fit_world_model(
    model: WorldModel,
    train: ReplayBuffer,
    tokens: torch.Tensor,
    heldout_data: dict[str, torch.Tensor],
    args: argparse.Namespace,
    path: Path,
) -> None:
    """--steps AdamW steps of G on segments of train (tokens (len(train), K)), measured on the held-out segments
    every --eval_every steps: a table printed and written to path."""
    config = model.config
    optimizer = model.configure_optimizer(args.lr, ADAM_BETAS)
    print(
        f"world model {config}\n{sum(p.numel() for p in model.parameters()):,} parameters, batch {args.batch}, "
        f"lr {args.lr}; held-out: {len(heldout_data['tokens'])} segments of {config.max_timesteps} steps, "
        f"{int((heldout_data['rewards'] != 0).sum())} nonzero rewards, {int(heldout_data['ends'].sum())} ends"
    )
    columns = [
        "step",
        "minutes",
        "loss",
        "token_acc",
        "copy_acc",
        "changed_acc",
        "reward_precision",
        "reward_recall",
        "end_precision",
        "end_recall",
    ]
    table = Table(columns, path)
    start, loss = time.time(), float("nan")  # loss: the last training batch's (none before step 1)
    for step in range(args.steps + 1):
        last = step == args.steps or time.time() - start > args.minutes * 60
        if step % args.eval_every == 0 or last:
            table.row(
                {
                    "step": step,
                    "minutes": (time.time() - start) / 60,
                    "loss": loss,
                    **world_model_metrics(model, heldout_data),
                }
            )
        if last:
            break
        batch = segment_batch(train, tokens, args.batch, config.max_timesteps)
        losses = model.loss(batch["tokens"], batch["actions"], batch["rewards"], batch["ends"], batch["mask"])
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        loss = losses["total"].item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()


@torch.no_grad()
def dream(
    tokenizer: Tokenizer, model: WorldModel, buffer: ReplayBuffer, tokens: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Section 2.3's imagination from DREAM_STARTS real held-out frames, driven by the recorded actions: the real
    frames and the imagined ones x̂_0 = D(z_0), ..., x̂_T, both (B, T+1, 3, 64, 64) in [0, 1]."""
    torch.manual_seed(seed)
    starts, lengths = buffer._episode_table()
    long_enough = torch.nonzero(lengths > DREAM_STEPS + 1).squeeze(1)
    first = starts[long_enough[torch.randint(len(long_enough), (DREAM_STARTS,))]]
    first = first + (torch.rand(DREAM_STARTS) * (lengths[long_enough].min() - DREAM_STEPS - 1)).long()  # (B,)
    steps = first[:, None] + torch.arange(DREAM_STEPS + 1)  # (B, T+1)
    real = to_unit(buffer.observations[steps])  # (B, T+1, 3, 64, 64)
    actions = buffer._data["actions"][steps]  # (B, T+1)
    env = WorldModelEnv(tokenizer, model)
    dreamed = [env.reset_from_tokens(tokens[steps[:, 0]])]  # x̂_0 (B, 3, 64, 64)
    for t in range(DREAM_STEPS):
        dreamed.append(env.step(actions[:, t])[2])
    return real, torch.stack(dreamed, dim=1)  # (B, T+1, 3, 64, 64) each


def ball_positions(frames: torch.Tensor, median: torch.Tensor, region: tuple[slice, slice]) -> torch.Tensor:
    """Frames (..., 3, 64, 64) in [0, 1] -> the ball's (row, column) in pixels (..., 2): the centroid of the
    foreground inside region (BALL_REGIONS), weighted by its contrast to the median frame; NaN without a ball."""
    contrast = (frames - median).abs().amax(dim=-3)[(..., *region)]  # (..., h, w)
    weight = contrast * (contrast > FOREGROUND_THRESHOLD)
    rows = torch.arange(region[0].start, region[0].stop, dtype=frames.dtype)  # (h,)
    columns = torch.arange(region[1].start, region[1].stop, dtype=frames.dtype)  # (w,)
    total = weight.sum(dim=(-2, -1))  # (...,)
    row = (weight.sum(-1) * rows).sum(-1) / total
    column = (weight.sum(-2) * columns).sum(-1) / total
    return torch.stack([row, column], dim=-1).masked_fill((total == 0).unsqueeze(-1), NAN)


def dream_ball_table(
    real: torch.Tensor, dreamed: torch.Tensor, median: torch.Tensor, region: tuple[slice, slice], path: Path
) -> None:
    """Does G's ball move as the real one? Over the imagined steps t >= 1 (rows of DREAM_WINDOW steps) where the real
    frame has a ball: the share of x̂_t that draw one; and, where both do, the distance (pixels) from the real ball
    to x̂_t's, against two balls that know nothing of the dynamics: a frozen one (the real ball of step 0, where it
    had one) and one at the real balls' mean position."""
    p, q = ball_positions(real, median, region), ball_positions(dreamed, median, region)  # (B, T+1, 2) each
    frozen = p[:, :1].expand_as(p)  # (B, T+1, 2)
    mean = p.flatten(0, 1).nanmean(dim=0)  # (2,)
    table = Table(["steps", "real_balls", "drawn", "distance", "frozen_distance", "mean_distance"], path)
    for first in range(1, real.shape[1], DREAM_WINDOW):
        window = slice(first, first + DREAM_WINDOW)
        p_w, q_w, f_w = p[:, window], q[:, window], frozen[:, window]
        has_ball = ~p_w[..., 0].isnan()  # (B, W)
        both = has_ball & ~q_w[..., 0].isnan() & ~f_w[..., 0].isnan()
        table.row(
            {
                "steps": f"{first}-{first + p_w.shape[1] - 1}",
                "real_balls": int(has_ball.sum()),
                "drawn": (~q_w[..., 0].isnan())[has_ball].float().mean().item() if has_ball.any() else NAN,
                "distance": (p_w - q_w).norm(dim=-1)[both].mean().item() if both.any() else NAN,
                "frozen_distance": (p_w - f_w).norm(dim=-1)[both].mean().item() if both.any() else NAN,
                "mean_distance": (p_w - mean).norm(dim=-1)[both].mean().item() if both.any() else NAN,
            }
        )


def save_dream(real: torch.Tensor, dreamed: torch.Tensor, path: Path) -> None:
    """GIF: real held-out frames (top) above G's imagination from the first of them (bottom), both (B, T+1, 3, 64, 64)
    in [0, 1]; and a PNG of the first trajectory's steps 0, DREAM_STRIDE, ... (PICTURE_FRAMES of them)."""
    images = [two_rows(real[:, t], dreamed[:, t]) for t in range(real.shape[1])]
    images[0].save(path, save_all=True, append_images=images[1:], duration=GIF_MS, loop=0)
    steps = torch.arange(PICTURE_FRAMES) * DREAM_STRIDE
    two_rows(real[0, steps], dreamed[0, steps]).save(path.with_suffix(".png"))


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


class Table:
    """Prints one aligned row per evaluation and appends it to a CSV file."""

    def __init__(self, columns: list[str], path: Path) -> None:
        self.columns, self.path = columns, path
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(columns)
        print(" | ".join(f"{c:>14}" for c in columns), flush=True)

    def row(self, values: dict[str, float]) -> None:
        cells = [values[c] for c in self.columns]
        print(" | ".join(f"{v:>14.4f}" if isinstance(v, float) else f"{v:>14}" for v in cells), flush=True)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(cells)


# ----------------------------------------------------------------------------------------------------------------------
# Stage 3: the whole of Algorithm 1 is train.py's; here its evaluations, against a random policy, as a curve


def mean_ci(returns: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (normal approximation, Section 3.2's episodes)."""
    values = np.asarray(returns, dtype=np.float64)
    half = Z_95 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(half)


def random_returns(game: str, env_config: EnvConfig, episodes: int, seed: int, out: Path) -> list[float]:
    """Returns of a uniformly random policy under a run's test protocol (env.py, train=False); cached in out."""
    name = f"random_{game.replace('/', '_').replace(':', '_')}_{episodes}_{env_config.max_test_frames}.json"
    path = out / name
    if path.is_file():
        return json.loads(path.read_text())["returns"]
    num_actions = len(action_names(game, env_config))
    rng = np.random.default_rng(seed)

    def policy(obs: np.ndarray, first: np.ndarray) -> np.ndarray:  # uniformly random actions
        return rng.integers(num_actions, size=len(obs))

    returns = run_episodes(game, policy, episodes, seed=seed, train=False, config=env_config)
    write_json(path, {"game": game, "episodes": episodes, "returns": returns})
    return returns


def run_evaluations(run_dir: Path) -> tuple[str, EnvConfig, list[tuple[int, list[float]]], dict | None]:
    """A train.py run's game, env config, evaluations during training (env steps, returns) and final evaluation."""
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    points = [(int(row["env_steps"]), row["eval/returns"]) for row in checkpoint["history"] if "eval/returns" in row]
    final_path = run_dir / FINAL_EVAL
    final = json.loads(final_path.read_text()) if final_path.is_file() else None
    return checkpoint["game"], EnvConfig(**checkpoint["config"]["env"]), points, final


def learning_curve(args: argparse.Namespace) -> None:
    """Stage 3: evaluation return against env steps for each run, and a random policy's, as a table and a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    if not args.runs:
        raise SystemExit("learn.py curve: give the run directories of train.py runs with --runs DIR [DIR ...]")
    fig, ax = plt.subplots(figsize=(7, 4))
    protocols = {}  # game -> the test env config of its runs, which the random policy plays too
    for run_dir in map(Path, args.runs):
        game, env_config, points, final = run_evaluations(run_dir)
        protocols[game] = env_config
        stats = [(steps, *mean_ci(returns), len(returns)) for steps, returns in points]
        for steps, mean, half, n in stats:
            print(f"{run_dir.name} | env steps {steps:>7} | return {mean:8.2f} ± {half:.2f} (95% CI, {n} episodes)")
        if stats:
            steps, means, halves, _ = zip(*stats)
            ax.errorbar(steps, means, yerr=halves, marker="o", capsize=3, label=f"{run_dir.name} (evaluations)")
        if final is not None:
            mean, half = mean_ci(final["returns"])
            print(
                f"{run_dir.name} | final evaluation at env steps {final['env_steps']} | return {mean:8.2f} ± "
                f"{half:.2f} (95% CI, {len(final['returns'])} episodes)"
            )
            ax.errorbar(
                [final["env_steps"]], [mean], yerr=[half], marker="s", capsize=4, label=f"{run_dir.name} (final)"
            )
    for game, env_config in sorted(protocols.items()):
        returns = random_returns(game, env_config, args.random_episodes, args.seed, Path(args.out))
        mean, half = mean_ci(returns)
        print(f"random policy | {game} | return {mean:8.2f} ± {half:.2f} (95% CI, {args.random_episodes} episodes)")
        ax.axhspan(mean - half, mean + half, color="grey", alpha=0.3, label=f"random policy, {game} (95% CI)")
    ax.set_xlabel("env steps")
    ax.set_ylabel("evaluation return")
    ax.legend(fontsize=8)
    path = Path(args.out) / "learning_curve.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def baselines(args: argparse.Namespace) -> None:
    """Stage 3's choice of game: how far a random policy is from the best action held constant, per game, under the
    test protocol (env.py, train=False, --max_test_frames). A wide gap is a reward that a policy can find early:
    the agent has something to learn before it can play well."""
    games = args.games or [args.game]
    env_config = replace(EnvConfig(), max_test_frames=args.max_test_frames)
    out = Path(args.out)
    print(f"test protocol, at most {args.max_test_frames} frames a game; 95% CIs")
    for game in games:
        names = action_names(game, env_config)
        mean, half = mean_ci(random_returns(game, env_config, args.random_episodes, args.seed, out))
        print(f"{game} | random policy | {mean:8.1f} ± {half:.1f} ({args.random_episodes} episodes)")
        for action, name in enumerate(names):

            def constant(obs: np.ndarray, first: np.ndarray, action: int = action) -> np.ndarray:
                return np.full(len(obs), action)

            returns = run_episodes(game, constant, args.constant_episodes, seed=args.seed, config=env_config)
            mean, half = mean_ci(returns)
            print(f"{game} | always {name:<13} | {mean:8.1f} ± {half:.1f} ({args.constant_episodes} episodes)")


def action_pattern(spec: str, meanings: list[str]) -> list[int] | None:
    """An action pattern, played in turn: names or indices of the game's actions (with NOOP, UP, DOWN: "UP,DOWN" and
    "1,2" -> [1, 2]), or "random" -> None (uniform draws)."""
    if spec == RANDOM_PATTERN:
        return None
    pattern = []
    for name in spec.split(","):
        if name.isdigit() and int(name) < len(meanings):
            pattern.append(int(name))
        elif name in meanings:
            pattern.append(meanings.index(name))
        else:
            raise SystemExit(f"learn.py imagine: no action {name!r}; this game's are {', '.join(meanings)}")
    return pattern


def pattern_actions(
    pattern: list[int] | None, t: int, count: int, num_actions: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The actions of step t for count trajectories or envs: the pattern's t-th (in turn), or uniform draws."""
    if pattern is None:
        return torch.randint(num_actions, (count,), generator=generator)
    return torch.full((count,), pattern[t % len(pattern)], dtype=torch.int64)


@torch.no_grad()
def imagined_reward_rate(
    wm_env: WorldModelEnv, frames: torch.Tensor, pattern: list[int] | None, num_actions: int, horizon: int
) -> float:
    """Sum of r̂_t per 100 imagined steps, trajectories starting from real frames (B, 3, 64, 64) and acting by the
    pattern; each trajectory counts up to its first imagined end d̂_t = 1, as the actor-critic's losses do."""
    wm_env.reset(frames)
    alive = torch.ones(len(frames))  # (B,) 1 until the first imagined end
    total = steps = 0.0
    for t in range(horizon):
        rewards, ends, _ = wm_env.step(pattern_actions(pattern, t, len(frames), num_actions), decode=False)
        total += (alive * rewards).sum().item()
        steps += alive.sum().item()
        alive = alive * (1 - ends)
    return 100 * total / steps


def real_reward_rate(
    game: str, env_config: EnvConfig, pattern: list[int] | None, steps: int, seed: int
) -> tuple[float, int]:
    """Sum of sign(r_t) (the classes G predicts, Eq. (2)) per 100 steps of the real game under the test protocol,
    acting by the pattern across episodes; and the number of episodes begun."""
    env = make_env(game, train=False, seed=seed, config=env_config)
    generator = torch.Generator().manual_seed(seed)
    total, episodes = 0.0, 1
    for t in range(steps):
        action = int(pattern_actions(pattern, t, 1, env.action_space.n, generator))
        _, reward, terminated, truncated, _ = env.step(action)
        total += float(np.sign(reward))
        if terminated or truncated:
            env.reset()
            episodes += 1
    env.close()
    return 100 * total / steps, episodes


def imagine(args: argparse.Namespace) -> None:
    """Does G's imagination reward what the real game rewards? For each action pattern (default: each action held
    constant, and a random policy), the rewards that a run's G imagines from --starts frames of its dataset over
    --horizon steps, beside those of --real_steps of the real game played the same way."""
    run_dir, agent, buffer, args = load_run(args, "imagine", "actor_critic_batch_size")
    config = agent.config
    meanings = action_names(config.game, config.env)
    specs = args.patterns or [*meanings, RANDOM_PATTERN]
    horizon = args.horizon or config.actor_critic.imagination_horizon
    torch.manual_seed(args.seed)
    frames = buffer.observations[torch.randint(len(buffer), (args.starts,))]  # x_0, (starts, 3, 64, 64)
    wm_env = WorldModelEnv(agent.tokenizer, agent.world_model)
    print(f"{run_dir}: {args.starts} imagined trajectories of {horizon} steps; {args.real_steps} real steps each")
    print("actions | imagined rewards per 100 steps | real, per 100 steps (episodes)")
    for spec in specs:
        pattern = action_pattern(spec, meanings)
        imagined = imagined_reward_rate(wm_env, frames, pattern, agent.num_actions, horizon)
        real, episodes = real_reward_rate(config.game, config.env, pattern, args.real_steps, args.seed)
        print(f"{spec:<24} | {imagined:8.2f} | {real:8.2f} ({episodes})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CLIParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "stage",
        choices=sorted(STAGES),
        help="stage 1, 2 (needs stage 1's outputs), 3 (curve; baselines: the choice of game), or a run's E or G",
    )
    parser.add_argument("--game", default=GAME)
    parser.add_argument("--out", default="runs/learn", help="data, checkpoints, pictures and metrics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=None, help="training steps (stage default if unset)")
    parser.add_argument("--eval_every", type=int, default=None, help="steps between held-out measurements")
    parser.add_argument("--batch", type=int, default=None, help="frames (stage 1) or segments (stage 2) per step")
    parser.add_argument("--lr", type=float, default=None, help="Adam(W) learning rate")
    parser.add_argument("--minutes", type=float, default=float("inf"), help="stop training after this wall time")
    tok = parser.add_argument_group("stage 1: tokenizer")
    tok.add_argument(
        "--restart_every",
        type=int,
        default=None,
        help="steps between dead-code restarts; 0: none (the paper, train.py)",
    )
    for name in ("ch", "z_channels", "vocab_size", "embed_dim"):
        tok.add_argument(f"--{name}", type=int, default=TOKENIZER_SMALL[name])
    tok.add_argument("--reconstruction_loss", choices=RECONSTRUCTION_LOSSES, default="l1", help="l1: Appendix A.1")
    tok.add_argument(
        "--min_lr",
        type=float,
        default=None,
        help="cosine decay of the learning rate from --lr to this over --steps (not the paper; unset: constant)",
    )
    tok.add_argument(
        "--foreground_weight",
        type=float,
        default=0.0,
        help="w: reconstruction errors of foreground pixels count 1 + w times (not the paper; 0: unweighted)",
    )
    tok.add_argument(
        "--continuous_steps",
        type=int,
        default=0,
        help="first steps with E and D alone, D(E(x)), then k-means codes (not the paper); >= --steps: no codebook",
    )
    wm = parser.add_argument_group("stage 2: world model")
    wm.add_argument("--timesteps", type=int, default=WORLD_MODEL_SMALL["max_timesteps"], help="L, steps per segment")
    wm.add_argument("--num_layers", type=int, default=WORLD_MODEL_SMALL["num_layers"])
    wm.add_argument("--wm_embed_dim", dest="wm_embed_dim", type=int, default=WORLD_MODEL_SMALL["embed_dim"])
    loop = parser.add_argument_group("stage 3: curve of train.py runs")
    loop.add_argument("--runs", nargs="*", default=[], help="train.py run directories")
    loop.add_argument("--random_episodes", type=int, default=RANDOM_EPISODES, help="episodes of the random policy")
    loop.add_argument(
        "--heldout_steps",
        type=int,
        default=HELDOUT_RUN_STEPS,
        help="run_world_model, run_tokenizer: last steps kept out",
    )
    loop.add_argument("--dropout", type=float, default=None, help="run_world_model: G's dropout (default: the run's)")
    loop.add_argument("--games", nargs="*", default=[], help="baselines: the games (default: --game)")
    loop.add_argument("--constant_episodes", type=int, default=CONSTANT_EPISODES, help="baselines: per action")
    loop.add_argument("--max_test_frames", type=int, default=BASELINE_FRAMES, help="baselines: cap of each game")
    loop.add_argument(
        "--patterns", nargs="*", default=[], help="imagine: e.g. DOWN UP,DOWN random (default: each action, random)"
    )
    loop.add_argument("--starts", type=int, default=IMAGINE_STARTS, help="imagine: imagined trajectories")
    loop.add_argument("--horizon", type=int, default=None, help="imagine: imagined steps (default: the run's H)")
    loop.add_argument("--real_steps", type=int, default=REAL_STEPS, help="imagine: real steps per pattern")
    args = parser.parse_args(argv)
    stage_defaults = STAGE_DEFAULTS.get(args.stage, {})
    for name, value in stage_defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


STAGE_DEFAULTS = {
    "tokenizer": {"steps": 1_000, "eval_every": 100, "batch": 16, "lr": 1e-3, "restart_every": RESTART_EVERY},
    "world_model": {"steps": 3_000, "eval_every": 200, "batch": 16, "lr": 1e-3},
    "run_world_model": {"steps": 3_000, "eval_every": 250},  # batch and lr: the run's own
    "run_tokenizer": {"steps": 1_200, "eval_every": 100, "restart_every": 0},  # as in the loop: no restarts
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    STAGES[args.stage](args)


STAGES = {
    "tokenizer": train_tokenizer,
    "world_model": train_world_model,
    "curve": learning_curve,
    "run_world_model": run_world_model,
    "run_tokenizer": run_tokenizer,
    "baselines": baselines,
    "imagine": imagine,
}


if __name__ == "__main__":
    main()
