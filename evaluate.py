"""Evaluation as in Section 3.2 of the paper: test returns, human-normalised scores (HNS) and the aggregate
metrics of Table 1 and Figure 5 (mean, median, interquartile mean, optimality gap of Appendix C), each with
stratified bootstrap confidence intervals (Agarwal et al., 2021).

    python evaluate.py RUN_DIR_OR_CHECKPOINT [--episodes 100] [--envs 8] [--temperature 0.5] [--seed S] [--record]
    python evaluate.py --aggregate RUN_DIR_OR_EVAL_JSON_OR_SWEEP... [--out aggregate.json] [--scores_out runs.json]
    python evaluate.py --authors_checkpoint Pong.pt [--game Pong] [--episodes 100]   # the authors' published agent

One run. The first form loads `RUN_DIR/checkpoint.pt` (or the checkpoint file given), plays the test env of
env.py (no episode end on life loss, ε = 0, episodes capped at 108,000 frames) with the agent sampling at
temperature 0.5 (Table 5), prints every episode's return, their mean with a bootstrap 95% CI, and the HNS
(score - random) / (human - random) with the Random and Human scores of Table 1. It writes the same to
`RUN_DIR/eval.json` (or --out). `--record` saves the best episode as `best_episode.gif` (or .mp4): the real
64x64 frame x_t beside what the policy sees, x̂_t = D(E(x_t)).

Many runs. `--aggregate` reads one score per run: RUN_DIR/final_eval.json, written by train.py at the end of
training (Section 3.2's protocol: 100 test episodes), or the file named by --score_file (eval.json: the first
form's output), or a JSON file given directly. A sweep directory of sweep.py (it holds sweep.json) stands for its
runs; those not finished yet are left out, and named. Each file must name its "game" and hold a number
"mean_return" or a list of numbers "returns"; the file each score came from is printed. Runs of the same game are
that game's runs (seeds). It prints a table in the layout of Table 1 (the paper's IRIS score beside ours) and the
four aggregates of HNS with stratified bootstrap 95% CIs. --scores_out writes the per-run scores in the layout of
the authors' IRIS.json ({"Pong": [score of run 1, ...], ...}, as scores.json's "iris"), to compare line by line.

Which definitions reproduce the paper (Table 1, from IRIS's 5 runs x 26 games, see test_iris.py):
    mean            of per-game mean HNS                      1.046 (the same pooled over runs x games)
    median          of per-game mean HNS                      0.289 (pooled over runs x games: 0.284)
    IQM             25% trimmed mean pooled over runs x games 0.501 (of per-game means: 0.543)
    optimality gap  mean of max(0, 1 - HNS), pooled          0.512 (of per-game means: 0.482)
These are the definitions of rliable (metrics.aggregate_*), which the authors used. #Superhuman counts games
whose mean HNS is >= 1 (Pong ties the human score of 14.6; counting it gives the paper's 10).
Stratified bootstrap: each replicate resamples, with replacement, the runs of every game separately (the games
are the strata) and recomputes the metric; the CI is the percentile interval (rliable's default).

We do not use rliable itself: it pulls in arch, scipy, pandas and seaborn, none of which the rest of iris needs;
the four metrics and the bootstrap take a few lines of numpy, tested against the paper's numbers.
Reference scores (Random, Human, IRIS's published per-run scores) ship in scores.json beside this file.
Playing episodes needs env.py and agent.py (torch, ALE); --aggregate and the metric functions need only numpy.
"""

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCORES_PATH = Path(__file__).with_name("scores.json")
SCORE_FILES = ("final_eval.json", "eval.json")  # train.py's final evaluation (Section 3.2), this script's own
SWEEP_FILE = "sweep.json"  # sweep.py's plan: {"runs": [{"dir": run directory, relative to the sweep}, ...], ...}
METRICS = ("mean", "median", "iqm", "optimality_gap")
METRIC_LABELS = {"mean": "Mean (↑)", "median": "Median (↑)", "iqm": "IQM (↑)", "optimality_gap": "Optimality Gap (↓)"}


@dataclass
class EvalConfig:
    """How results are summarised and recorded. How episodes are played (their number, the parallel envs, the
    temperature) comes from the agent's IRISConfig: final_eval_episodes, eval_envs, eval_temperature."""

    seed: int = 0  # seeds the envs, the policy's sampling and the bootstrap
    bootstrap_reps: int = 50_000  # bootstrap replicates, as the authors' results notebook (rliable)
    confidence: float = 0.95  # 95% confidence intervals, Figure 5
    optimality_threshold: float = 1.0  # the optimality gap's human level, HNS = 1 (Appendix C; rliable's gamma)
    record_format: str = "gif"  # "gif" (Pillow) or "mp4" (OpenCV)
    record_scale: int = 2  # upscale the 64x64 frames for viewing
    record_fps: int = 15  # 60 Hz Atari / frame skip 4


class EvaluationError(ValueError):
    """Bad input that evaluate.py refuses, with a message for the user."""


# --- reference scores --------------------------------------------------------------------------------------------


def _key(game: str) -> str:
    return re.sub(r"[^a-z0-9]", "", game.lower())


def load_reference_scores(path: Path = SCORES_PATH) -> dict:
    """{"random": {game: score}, "human": {game: score}, "iris": {game: [score per run]}} from Table 1's sources."""
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def reference(game: str, table: str, scores: dict | None = None):
    """A game's entry in one reference table ("random", "human", "iris"), or None if the game is not there."""
    entries = (scores or load_reference_scores())[table]
    by_key = {_key(name): value for name, value in entries.items()}
    return by_key.get(_key(game))


def human_normalized(returns, game: str, scores: dict | None = None) -> tuple[np.ndarray | None, str | None]:
    """HNS = (score - random) / (human - random), Section 3.2; (None, reason) for a game without both scores."""
    scores = scores or load_reference_scores()
    random_score, human_score = reference(game, "random", scores), reference(game, "human", scores)
    if random_score is None or human_score is None:
        return None, f"no Random/Human score for {game} in Table 1 (the 26 Atari 100k games), so no HNS"
    return (np.asarray(returns, dtype=np.float64) - random_score) / (human_score - random_score), None


# --- aggregate metrics (Agarwal et al., 2021) ---------------------------------------------------------------------


def interquartile_mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean of the middle 50%: drop floor(n/4) values at each end (scipy.stats.trim_mean(x, 0.25), as rliable)."""
    x = np.sort(np.asarray(x, dtype=np.float64), axis=axis)
    n = x.shape[axis]
    cut = int(0.25 * n)
    return np.take(x, np.arange(cut, n - cut), axis=axis).mean(axis=axis)


def _aggregates(per_game: list[np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    """The four metrics from per_game[g]: (..., n_g) HNS of game g's runs; each metric has shape (...)."""
    game_means = np.stack([runs.mean(-1) for runs in per_game], axis=-1)  # (..., G)
    pooled = np.concatenate(per_game, axis=-1)  # (..., sum of n_g): all runs x games
    gaps = np.stack([np.maximum(0.0, threshold - runs).mean(-1) for runs in per_game], axis=-1)  # (..., G)
    return {
        "mean": game_means.mean(-1),
        "median": np.median(game_means, axis=-1),
        # Pooled: a game with more runs weighs more; with equal runs per game this is rliable's aggregate_iqm.
        "iqm": interquartile_mean(pooled, axis=-1),
        # Per-game mean gap, then mean over games: equal to rliable's pooled gap when runs per game are equal.
        "optimality_gap": gaps.mean(-1),
    }


def aggregate_metrics(
    hns_by_game: dict[str, list[float]], threshold: float = EvalConfig.optimality_threshold
) -> dict[str, float]:
    """Point estimates of mean, median, IQM, optimality gap and #superhuman games (Table 1) of HNS per run."""
    per_game = [np.asarray(runs, dtype=np.float64) for runs in hns_by_game.values()]
    metrics = {name: float(value) for name, value in _aggregates(per_game, threshold).items()}
    # Tolerance: Pong's mean IRIS score equals the human score (14.6) up to float rounding; the paper counts it.
    metrics["superhuman"] = int(sum(runs.mean() >= 1.0 - 1e-9 for runs in per_game))
    return metrics


def stratified_bootstrap_ci(
    hns_by_game: dict[str, list[float]],
    rng: np.random.Generator,
    reps: int = EvalConfig.bootstrap_reps,
    confidence: float = EvalConfig.confidence,
    threshold: float = EvalConfig.optimality_threshold,
) -> dict[str, tuple[float, float]]:
    """Percentile CIs of the four metrics, resampling each game's runs with replacement (games are the strata)."""
    per_game = []
    for runs in hns_by_game.values():
        runs = np.asarray(runs, dtype=np.float64)
        per_game.append(runs[rng.integers(0, len(runs), size=(reps, len(runs)))])  # (reps, n_g)
    replicates = _aggregates(per_game, threshold)  # each (reps,)
    return {name: _percentile_interval(values, confidence) for name, values in replicates.items()}


def bootstrap_mean_ci(values, rng: np.random.Generator, reps: int, confidence: float) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of one run's episode returns."""
    values = np.asarray(values, dtype=np.float64)
    means = values[rng.integers(0, len(values), size=(reps, len(values)))].mean(-1)  # (reps,)
    return _percentile_interval(means, confidence)


def _percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(low), float(high)


# --- --aggregate: many runs ----------------------------------------------------------------------------------------


def read_run_score(path: Path, score_file: str = SCORE_FILES[0]) -> tuple[str, float, Path, int | None]:
    """(game, mean test return, file read, episodes or None) of one run: a run directory or a score JSON file.

    A run directory is read through its score_file only: a 5-episode eval.json never stands in silently for the
    100-episode final_eval.json of the paper's protocol.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / score_file).is_file():
            others = [name for name in SCORE_FILES if name != score_file and (path / name).is_file()]
            if others:
                hint = f"; it holds {others[0]}: read that with --score_file {others[0]}"
            elif score_file == SCORE_FILES[0]:
                hint = "; train.py writes it when the run ends"
            else:
                hint = f"; run `python evaluate.py {path}` first"
            raise EvaluationError(f"{path}: no {score_file}{hint}")
        path = path / score_file
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EvaluationError(f"{path}: cannot read a run's scores ({error})") from error
    if not isinstance(result, dict):
        raise EvaluationError(f"{path}: holds a JSON {type(result).__name__}, not an object with 'game' and scores")
    game = result.get("game")
    if not isinstance(game, str) or not game:
        raise EvaluationError(f"{path}: does not name its 'game' (found {game!r})")
    returns = result.get("returns")
    if "mean_return" in result:
        if not _is_number(result["mean_return"]):
            raise EvaluationError(f"{path}: 'mean_return' is {result['mean_return']!r}, not a finite number")
        mean_return = float(result["mean_return"])
    elif isinstance(returns, list) and returns and all(_is_number(r) for r in returns):
        mean_return = float(np.mean(returns))
    elif "returns" in result:
        raise EvaluationError(f"{path}: 'returns' is {returns!r}, not a non-empty list of finite numbers")
    else:
        raise EvaluationError(f"{path}: holds neither 'mean_return' nor 'returns'")
    episodes = result.get("episodes", len(returns) if isinstance(returns, list) else None)
    return game, mean_return, path, episodes if isinstance(episodes, int) else None


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))


def expand_sweeps(paths: list[Path], score_file: str = SCORE_FILES[0]) -> tuple[list[Path], list[str]]:
    """The paths with each sweep directory (holding sweep.json) replaced by its runs, in the sweep's order; and the
    runs of sweeps left out because they hold no score_file yet (not finished)."""
    expanded, unfinished = [], []
    for path in map(Path, paths):
        if not (path.is_dir() and (path / SWEEP_FILE).is_file()):
            expanded.append(path)
            continue
        try:
            runs = [path / run["dir"] for run in json.loads((path / SWEEP_FILE).read_text())["runs"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise EvaluationError(f"{path / SWEEP_FILE}: not a sweep plan of sweep.py ({error!r})") from error
        expanded += [run for run in runs if (run / score_file).is_file()]
        unfinished += [str(run) for run in runs if not (run / score_file).is_file()]
    return expanded, unfinished


def table1_name(game: str, scores: dict) -> str:
    """The game's spelling in Table 1 (and in the authors' IRIS.json) when it is one of its games."""
    return next((name for name in scores["human"] if _key(name) == _key(game)), game)


def aggregate_runs(
    paths: list[Path], config: EvalConfig, scores: dict | None = None, score_file: str = SCORE_FILES[0]
) -> dict:
    """Group runs by game, normalise, and compute the aggregates (ours with CIs, the paper's IRIS on the same games)."""
    scores = scores or load_reference_scores()
    paths, unfinished = expand_sweeps(paths, score_file)
    if not paths:
        raise EvaluationError(f"no finished run to aggregate ({len(unfinished)} without {score_file})")
    returns_by_game: dict[str, list[float]] = {}
    sources = []
    for path in paths:
        game, mean_return, file, episodes = read_run_score(path, score_file)
        name = table1_name(game, scores)
        returns_by_game.setdefault(name, []).append(mean_return)
        sources.append({"game": name, "mean_return": mean_return, "file": str(file), "episodes": episodes})
    games, hns_by_game, excluded = {}, {}, {}
    for game, returns in returns_by_game.items():
        hns, reason = human_normalized(returns, game, scores)
        iris_runs = reference(game, "iris", scores)
        games[game] = {
            "returns_per_run": returns,
            "mean_return": float(np.mean(returns)),
            "hns_per_run": None if hns is None else hns.tolist(),
            "iris_paper": None if iris_runs is None else float(np.mean(iris_runs)),
            "random": reference(game, "random", scores),
            "human": reference(game, "human", scores),
        }
        if hns is None:
            excluded[game] = reason
        else:
            hns_by_game[game] = hns.tolist()
    result = {
        "games": games,
        "excluded": excluded,
        "sources": sources,
        "unfinished": unfinished,
        "score_file": score_file,
        "confidence": config.confidence,
        "seed": config.seed,
    }
    if hns_by_game:
        rng = np.random.default_rng(config.seed)
        ours = aggregate_metrics(hns_by_game, config.optimality_threshold)
        cis = stratified_bootstrap_ci(
            hns_by_game, rng, config.bootstrap_reps, config.confidence, config.optimality_threshold
        )
        result["metrics"] = {name: {"value": ours[name], "ci": list(cis[name])} for name in METRICS}
        result["metrics"]["superhuman"] = {"value": ours["superhuman"], "ci": None}
        iris_hns = {g: human_normalized(reference(g, "iris", scores), g, scores)[0] for g in hns_by_game}
        if all(hns is not None for hns in iris_hns.values()):
            result["iris_paper_metrics"] = aggregate_metrics(iris_hns, config.optimality_threshold)
    return result


def per_run_scores(result: dict) -> dict[str, list[float]]:
    """{game: [mean return of each run]}, games sorted: the layout of the authors' IRIS.json (scores.json's "iris")."""
    return {game: result["games"][game]["returns_per_run"] for game in sorted(result["games"])}


def format_sources(result: dict) -> str:
    """One line per run: its score and the file it came from; then the sweeps' runs left out."""
    protocol = {
        "final_eval.json": "the final evaluation of train.py, Section 3.2's protocol",
        "eval.json": "evaluate.py's evaluations of the checkpoints, not the final ones of train.py",
    }
    lines = [f"Score of each run (run directories: {result['score_file']}, {protocol[result['score_file']]}):"]
    for source in result["sources"]:
        episodes = "" if source["episodes"] is None else f" ({source['episodes']} episodes)"
        lines.append(f"  {source['game']:<16}{source['mean_return']:>11.2f}  {source['file']}{episodes}")
    if result["unfinished"]:
        lines.append(f"Left out, not finished: {', '.join(result['unfinished'])}")
    return "\n".join(lines) + "\n"


def format_table(result: dict) -> str:
    """Table 1's layout: per-game returns, then the HNS aggregates (ours with CIs)."""
    header = f"{'Game':<18}{'Random':>10}{'Human':>10}{'IRIS (paper)':>14}{'Ours':>11}{'runs':>6}"
    rows = [header, "-" * len(header)]
    for game, row in sorted(result["games"].items()):
        cells = [_fmt(row["random"], ".1f"), _fmt(row["human"], ".1f"), _fmt(row["iris_paper"], ".1f")]
        rows.append(
            f"{game:<18}{cells[0]:>10}{cells[1]:>10}{cells[2]:>14}{row['mean_return']:>11.1f}"
            f"{len(row['returns_per_run']):>6}"
        )
    rows.append("-" * len(header))
    if "metrics" in result:
        paper = result.get("iris_paper_metrics", {})
        ours = result["metrics"]
        rows.append(
            f"{'#Superhuman (↑)':<18}{'0':>10}{'N/A':>10}{_fmt(paper.get('superhuman'), 'd'):>14}"
            f"{ours['superhuman']['value']:>11d}"
        )
        for name in METRICS:
            random_value, human_value = (1.0, 0.0) if name == "optimality_gap" else (0.0, 1.0)
            low, high = ours[name]["ci"]
            rows.append(
                f"{METRIC_LABELS[name]:<18}{random_value:>10.3f}{human_value:>10.3f}"
                f"{_fmt(paper.get(name), '.3f'):>14}{ours[name]['value']:>11.3f}  [{low:.3f}, {high:.3f}]"
            )
        level = round(100 * result["confidence"])
        rows.append(
            f"Aggregates over the {len(result['games']) - len(result['excluded'])} games with HNS; "
            f"[ ] = {level}% stratified bootstrap CI; IRIS (paper) = its 5 published runs on the same games."
        )
    for game, reason in result["excluded"].items():
        rows.append(f"{game}: {reason}; left out of the aggregates.")
    return "\n".join(rows)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# --- one run: play the test env ------------------------------------------------------------------------------------


def resolve_checkpoint(path: Path) -> Path:
    path = Path(path)
    checkpoint = path / "checkpoint.pt" if path.is_dir() else path
    if not checkpoint.is_file():
        raise EvaluationError(f"{path}: no checkpoint (expected a run directory holding checkpoint.pt, or a .pt file)")
    return checkpoint


def load_agent(path: Path, game: str | None, device: str, authors: bool = False):
    """(agent, checkpoint dict, game) after refusing a checkpoint that does not fit the game or its run.

    authors=True: path is one of the authors' published <Game>.pt files (agent.AUTHORS_CHECKPOINT_URL).
    """
    # Imported here so that --aggregate and the metric functions need neither torch nor ALE.
    from agent import Agent, check_checkpoint, load_checkpoint, pick_device
    from env import canonical_game, make_env

    if authors:
        return load_authors_agent(path, game, device)
    checkpoint_path = resolve_checkpoint(path)
    config_file = checkpoint_path.parent / "config.json"
    run_config = json.loads(config_file.read_text()) if config_file.is_file() else None
    try:
        torch_device = pick_device(device)
        checkpoint = load_checkpoint(checkpoint_path)
        game = canonical_game(game or checkpoint["game"])
        env = make_env(game, train=False)
        check_checkpoint(checkpoint, checkpoint_path, game, int(env.action_space.n), run_config)
        env.close()
        agent = Agent.from_checkpoint(checkpoint, torch_device)  # the checkpoint is read once
    except (FileNotFoundError, RuntimeError, ValueError) as error:  # CheckpointError is a ValueError
        raise EvaluationError(str(error)) from error
    return agent, checkpoint, game


def load_authors_agent(path: Path, game: str | None, device: str):
    """The agent of one of the authors' <Game>.pt files; the game is --game, or else the file's name."""
    from agent import Agent, check_checkpoint, pick_device
    from env import canonical_game, make_env

    path = Path(path)
    if not path.is_file():
        raise EvaluationError(
            f"{path}: no such file; download one of the authors' agents, e.g. "
            f"curl -LO https://huggingface.co/eloialonso/iris/resolve/main/pretrained_models/Pong.pt"
        )
    try:
        game = canonical_game(game or path.stem)
        agent = Agent.from_authors_checkpoint(path, game, pick_device(device))
        checkpoint = {"game": game, "num_actions": agent.num_actions}
        env = make_env(game, train=False)
        check_checkpoint(checkpoint, path, game, int(env.action_space.n))
        env.close()
    except (RuntimeError, ValueError) as error:  # a file that is not theirs, another game's action set
        raise EvaluationError(f"{path}: {error}") from error
    return agent, checkpoint, game


class BestEpisodeRecorder:
    """An on_step hook of env.run_episodes keeping the real frames of the best counted episode.

    run_episodes gives env i a fixed share of the episodes (num_episodes split evenly, the first envs taking the
    remainder) and lets the others play on uncounted; we count the same way so that the video is one of the
    episodes reported.
    """

    def __init__(self, num_episodes: int, num_envs: int) -> None:
        self.quota = [num_episodes // num_envs + (i < num_episodes % num_envs) for i in range(num_envs)]
        self.played = [0] * num_envs
        self.frames: list[list[np.ndarray]] = [[] for _ in range(num_envs)]
        self.returns = [0.0] * num_envs
        self.best_return, self.best_frames = -float("inf"), []

    def on_step(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, dones: np.ndarray) -> None:
        """obs (n, 64, 64, 3) uint8: the frames x_t the actions were taken in."""
        for i in range(len(obs)):
            if self.played[i] >= self.quota[i]:
                continue
            self.frames[i].append(obs[i].copy())
            self.returns[i] += float(rewards[i])
            if dones[i]:
                if self.returns[i] > self.best_return:
                    self.best_return, self.best_frames = self.returns[i], self.frames[i]
                self.frames[i], self.returns[i] = [], 0.0
                self.played[i] += 1


def save_video(frames: list[np.ndarray], tokenizer, path: Path, config: EvalConfig) -> Path:
    """Each real frame x_t beside the policy's view x̂_t = D(E(x_t)), recomputed here (the autoencoder is
    deterministic), as a GIF or an MP4.

    Differs from the reference code: its play.sh -r also shows the full-resolution screen; run_episodes hands us
    the 64x64 observation only.
    """
    import torch

    from agent import write_video

    device = next(tokenizer.parameters()).device
    real = np.stack(frames)  # (T, 64, 64, 3) uint8
    views = []
    with torch.no_grad():
        for start in range(0, len(real), 256):  # chunks keep memory bounded on long episodes
            chunk = torch.as_tensor(real[start : start + 256], device=device).permute(0, 3, 1, 2)  # (t, 3, 64, 64)
            view = tokenizer.encode_decode(chunk).mul(255).round().to(torch.uint8)  # x̂, (t, 3, 64, 64)
            views.append(view.permute(0, 2, 3, 1).cpu().numpy())  # (t, 64, 64, 3)
    video = np.concatenate([real, np.concatenate(views)], axis=2)  # (T, 64, 128, 3)
    video = video.repeat(config.record_scale, axis=1).repeat(config.record_scale, axis=2)
    return write_video(video, path, config.record_fps)


def summarize_returns(
    game: str, returns: list[float], config: EvalConfig, temperature: float, scores: dict | None = None
) -> dict:
    """Mean return with a bootstrap CI and the HNS (or the reason there is none), as written to eval.json."""
    from agent import TEST_EPSILON  # what Agent.play_test_episodes played with

    rng = np.random.default_rng(config.seed)
    mean_return = float(np.mean(returns))
    low, high = bootstrap_mean_ci(returns, rng, config.bootstrap_reps, config.confidence)
    hns, reason = human_normalized([mean_return, low, high], game, scores)
    return {
        "game": game,
        "episodes": len(returns),
        "returns": [float(r) for r in returns],
        "mean_return": mean_return,
        "return_ci": [low, high],
        "confidence": config.confidence,
        "random_score": reference(game, "random", scores),
        "human_score": reference(game, "human", scores),
        "hns": None if hns is None else float(hns[0]),
        "hns_ci": None if hns is None else [float(hns[1]), float(hns[2])],
        "hns_note": reason,
        "temperature": temperature,
        "epsilon": TEST_EPSILON,
        "seed": config.seed,
    }


def format_result(result: dict) -> str:
    level = round(100 * result["confidence"])
    low, high = result["return_ci"]
    lines = [
        f"{result['game']} | {result['episodes']} episode{'s' * (result['episodes'] != 1)} "
        f"| temperature {result['temperature']} "
        f"| seed {result['seed']}",
        "returns: " + " ".join(f"{r:g}" for r in result["returns"]),
        f"mean return {result['mean_return']:.2f} ({level}% CI [{low:.2f}, {high:.2f}])",
    ]
    if result["hns"] is None:
        lines.append(f"human-normalised score: none ({result['hns_note']})")
    else:
        low, high = result["hns_ci"]
        lines.append(
            f"human-normalised score {result['hns']:.3f} ({level}% CI [{low:.3f}, {high:.3f}]) "
            f"with Random {result['random_score']:g} and Human {result['human_score']:g} (Table 1)"
        )
    return "\n".join(lines)


def evaluate_checkpoint(
    path: Path,
    config: EvalConfig,
    game: str | None = None,
    device: str = "auto",
    record: bool = False,
    out: Path | None = None,
    progress: bool = True,
    episodes: int | None = None,
    envs: int | None = None,
    temperature: float | None = None,
    authors: bool = False,
) -> dict:
    """Play test episodes with a checkpoint's agent; write eval.json (or out) and return it.

    episodes, envs and temperature default to the agent's final_eval_episodes, eval_envs and eval_temperature.
    """
    import torch

    from agent import setup_process
    from env import EnvConfig
    from replay import write_json

    agent, checkpoint, game = load_agent(path, game, device, authors)
    setup_process(agent.config, agent.device)
    episodes = episodes or agent.config.final_eval_episodes
    temperature = agent.config.eval_temperature if temperature is None else temperature
    num_envs = min(envs or agent.config.eval_envs, episodes)
    torch.manual_seed(config.seed)  # the policy samples its actions
    recorder = BestEpisodeRecorder(episodes, num_envs) if record else None
    # The test env of the agent's own env config (frame skip etc.): no life-loss ends, max_test_frames per episode.
    env_config = agent.config.env
    if env_config != EnvConfig():
        print(f"warning: {game}'s env config differs from the paper's protocol: {env_config}", file=sys.stderr)
    on_step = None if recorder is None else recorder.on_step
    returns = agent.play_test_episodes(
        episodes, config.seed, temperature, num_envs=num_envs, progress=progress, on_step=on_step
    )
    result = summarize_returns(game, returns, config, temperature)
    checkpoint_path = Path(path) if authors else resolve_checkpoint(path)
    result.update(
        checkpoint=str(checkpoint_path),
        max_frames=env_config.max_test_frames,
        epoch=checkpoint.get("epoch"),
        env_steps=checkpoint.get("env_steps"),
        video=None,
    )
    out = out or checkpoint_path.with_name("eval.json" if not authors else f"{checkpoint_path.stem}_eval.json")
    if recorder is not None and recorder.best_frames:
        video = out.with_name(f"best_episode.{config.record_format}")
        result["video"] = str(save_video(recorder.best_frames, agent.tokenizer, video, config))
        result["video_return"] = recorder.best_return
    result["out"] = str(out)
    write_json(out, result)
    return result


# --- command line -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = EvalConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # One line, as agent.CLIParser's errors: agent.py is not imported here, because it brings torch (seconds of
    # start-up) and --aggregate needs numpy only.
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")
    parser.add_argument("paths", nargs="*", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    parser.add_argument(
        "--authors_checkpoint",
        type=Path,
        metavar="GAME.pt",
        help="evaluate one of the authors' published agents (README: The authors' agents)",
    )
    parser.add_argument("--aggregate", action="store_true", help="aggregate many runs (games x seeds)")
    parser.add_argument("--episodes", type=int, help="test episodes (default: the agent's final_eval_episodes, 100)")
    parser.add_argument("--envs", type=int, help="parallel test environments (default: the agent's eval_envs)")
    parser.add_argument("--temperature", type=float, help="sampling (default: the agent's eval_temperature, 0.5)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="envs, policy sampling and bootstrap")
    parser.add_argument("--record", action="store_true", help="save the best episode (real frame | agent's view)")
    parser.add_argument("--record-format", choices=("gif", "mp4"), default=defaults.record_format)
    parser.add_argument("--game", help="refuse a checkpoint trained on another game")
    parser.add_argument("--device", default="auto", help="auto: cuda, then mps, then cpu")
    parser.add_argument("--reps", type=int, default=defaults.bootstrap_reps, help="bootstrap replicates")
    parser.add_argument("--out", type=Path, help="JSON output (default RUN_DIR/eval.json; --aggregate: none)")
    parser.add_argument(
        "--score_file",
        choices=SCORE_FILES,
        default=SCORE_FILES[0],
        help="--aggregate: the file read in each run directory (default: final_eval.json, the paper's protocol)",
    )
    parser.add_argument(
        "--scores_out", type=Path, help="--aggregate: per-run scores in the layout of the authors' IRIS.json"
    )
    args = parser.parse_args(argv)
    if args.authors_checkpoint is not None:
        if args.paths or args.aggregate:
            parser.error("--authors_checkpoint evaluates one file: give no run directory and no --aggregate")
        args.paths = [args.authors_checkpoint]
    elif not args.paths:
        parser.error("give a run directory or checkpoint, --authors_checkpoint GAME.pt, or --aggregate RUNS...")
    if not args.aggregate and len(args.paths) > 1:
        parser.error("give one run directory or checkpoint, or --aggregate for many")
    for name in ("episodes", "envs", "reps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.temperature is not None and args.temperature < 0:
        parser.error(f"--temperature must be at least 0 (0: argmax), got {args.temperature}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = EvalConfig(seed=args.seed, bootstrap_reps=args.reps, record_format=args.record_format)
    try:
        if args.aggregate:
            result = aggregate_runs(args.paths, config, score_file=args.score_file)
            print(format_sources(result))
            print(format_table(result))
            if args.out is not None:
                args.out.write_text(json.dumps(result, indent=2) + "\n")
                print(f"wrote {args.out}")
            if args.scores_out is not None:
                args.scores_out.write_text(json.dumps(per_run_scores(result), indent=4) + "\n")  # as IRIS.json
                print(f"wrote {args.scores_out}")
            return
        result = evaluate_checkpoint(
            args.paths[0],
            config,
            args.game,
            args.device,
            args.record,
            args.out,
            episodes=args.episodes,
            envs=args.envs,
            temperature=args.temperature,
            authors=args.authors_checkpoint is not None,
        )
    except EvaluationError as error:
        sys.exit(f"evaluate.py: error: {error}")
    print(format_result(result))
    if result["video"]:
        print(f"best episode (return {result['video_return']:g}): {result['video']}")
    print(f"wrote {result['out']}")


if __name__ == "__main__":
    main()
