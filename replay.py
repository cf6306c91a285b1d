"""The dataset D of Algorithm 1 (Appendix D): every real step {x_t, a_t, r_t, d_t}, sampled as padded segments.

World-model batches are segments of L = 20 steps that start at a uniform step of a uniformly chosen episode and
are padded at the end (Appendix A.2); actor-critic batches are 21-step segments that end at a uniform step, the
20 frames before the start of imagination being the burn-in (Appendix A.3), padded at the start. A segment never
crosses an episode boundary; the episode still being collected is sampled like the others. The mask says which
steps are real. Frames live in preallocated contiguous uint8 tensors grown in chunks, on any device, so that
sampling is a single gather (100k steps of 3x64x64 frames are 1.2 GB).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

FILE_FORMAT = "iris-replay-v1"  # a chunk: the steps from `start` on (0 if absent: a whole dataset in one file)
CHUNK_NAME = "steps_{:010d}.pt"  # chunk files in a dataset folder, named by their first step
FIELDS = ("observations", "actions", "rewards", "ends")  # x_t, a_t, r_t, d_t
DTYPES = {"observations": torch.uint8, "actions": torch.int64, "rewards": torch.float32, "ends": torch.bool}


def atomic_save(obj: Any, path: str | Path, previous: str | Path | None = None) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename: a kill leaves the old file or the new.

    previous: the old file at path is kept there (a hard link made just before the rename), so that path is never
    absent and the file before it survives a corrupt new one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the run from the user's group
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.is_file():
            keep_previous(path, Path(previous))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Text to a temporary file, fsync, then rename: a kill or a power cut leaves the old file or the new, never
    half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:  # newline="": the text's line ends as they are (csv writes \r\n)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: str | Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rows as CSV with a header, a column per name in columns (other keys left out), written as write_text does."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


def keep_previous(path: Path, previous: Path) -> None:
    """previous becomes the file now at path, atomically (a kill leaves the old previous or the new one)."""
    tmp = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)  # no copy: atomic_save replaces path by a new file, never writes into it
    except OSError:  # a file system without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, previous)


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.contiguous().numpy().view(np.uint8).reshape(-1))


class ReplayBuffer:
    """Steps in arrival order; episodes are contiguous runs of steps, described by the index of their first step."""

    def __init__(
        self, obs_shape: tuple[int, ...] = (3, 64, 64), chunk_size: int = 10_000, device: str | torch.device = "cpu"
    ):
        self.obs_shape = tuple(obs_shape)
        self.chunk_size = chunk_size  # steps added per growth: 10k frames are 123 MB
        self.device = torch.device(device)
        self._size = 0
        self._data = {
            name: torch.empty((0, *self.obs_shape) if name == "observations" else (0,), dtype=dtype, device=self.device)
            for name, dtype in DTYPES.items()
        }
        self._episode_starts: list[int] = []  # index of each episode's first step
        self._episode_open = False  # the last episode is still being collected
        self._starts_tensor: torch.Tensor | None = None  # (E,) cache of _episode_starts on self.device
        self._saved_to: Path | None = None  # the folder the first _saved steps are saved in (save appends to it)
        self._saved = 0

    # ---------------------------------------------------------------------------------------------------------
    # Filling

    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return self._data["actions"].shape[0]

    @property
    def num_episodes(self) -> int:
        return len(self._episode_starts)

    @property
    def episode_lengths(self) -> list[int]:
        bounds = self._episode_starts + [self._size]
        return [b - a for a, b in zip(bounds[:-1], bounds[1:])]

    def add(
        self, obs: np.ndarray | torch.Tensor, action: int, reward: float, terminated: bool, truncated: bool = False
    ) -> None:
        """One real step {x_t, a_t, r_t, d_t}: x_t is the frame a_t was taken in, (64, 64, 3) HWC or (3, 64, 64).

        d_t stores `terminated` only: a time-limit truncation closes the episode but is not an end of the MDP.
        """
        # Differs from the reference code: on the old gym API it stores a time-limit truncation as done = 1.
        frame = self._to_chw(obs)
        if self._size == self.capacity:
            self._grow(self._size + 1)
        if not self._episode_open:
            self._episode_starts.append(self._size)
            self._starts_tensor = None
            self._episode_open = True
        i = self._size
        self._data["observations"][i] = frame
        self._data["actions"][i] = int(action)
        self._data["rewards"][i] = float(reward)
        self._data["ends"][i] = bool(terminated)
        self._size += 1
        if terminated or truncated:
            self._episode_open = False

    def close_episode(self) -> None:
        """End the episode being collected without adding a step (e.g. when a resumed run starts a new game)."""
        self._episode_open = False

    def truncate(self, num_steps: int) -> None:
        """Keep the first num_steps steps only (a resumed run drops steps its checkpoint never saw)."""
        if not 0 <= num_steps <= self._size:
            raise ValueError(f"cannot truncate a replay buffer of {self._size} steps to {num_steps}")
        if num_steps < self._size:
            # The kept part's last episode is still open unless an episode began right after it.
            self._episode_open = num_steps > 0 and num_steps not in self._episode_starts
            self._episode_starts = [s for s in self._episode_starts if s < num_steps]
            self._starts_tensor = None
            self._size = num_steps
            if num_steps < self._saved:  # the saved chunks run past the cut: the next save writes them all anew
                self._saved_to, self._saved = None, 0

    def _to_chw(self, obs: np.ndarray | torch.Tensor) -> torch.Tensor:
        frame = torch.as_tensor(obs)
        if tuple(frame.shape) != self.obs_shape and tuple(frame.shape[-1:] + frame.shape[:-1]) == self.obs_shape:
            frame = frame.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
        if tuple(frame.shape) != self.obs_shape or frame.dtype != torch.uint8:
            raise ValueError(
                f"expected a uint8 frame of shape {self.obs_shape} or its HWC transpose, "
                f"got {frame.dtype} {tuple(frame.shape)}"
            )
        return frame

    def _grow(self, min_capacity: int) -> None:
        """Reallocate every field to the next multiple of chunk_size and copy the filled part over."""
        capacity = -(-min_capacity // self.chunk_size) * self.chunk_size
        for name, old in self._data.items():
            new = torch.empty((capacity, *old.shape[1:]), dtype=old.dtype, device=self.device)
            new[: self._size] = old[: self._size]
            self._data[name] = new

    # ---------------------------------------------------------------------------------------------------------
    # Sampling

    def _episode_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First step and length of every episode, (E,) int64 each, on self.device."""
        if self._starts_tensor is None:
            self._starts_tensor = torch.tensor(self._episode_starts, dtype=torch.int64, device=self.device)
        starts = self._starts_tensor
        stops = torch.cat([starts[1:], starts.new_tensor([self._size])])
        return starts, stops - starts

    def _uniform_below(self, high: torch.Tensor) -> torch.Tensor:
        """One uniform integer in [0, high_i) per row; exact integer arithmetic (high is at most a few million)."""
        return torch.randint(0, 2**62, high.shape, device=self.device) % high

    def sample(
        self,
        batch_size: int,
        sequence_length: int,
        sample_from_start: bool = True,
        device: str | torch.device | None = None,
    ) -> dict[str, torch.Tensor]:
        """B segments of T steps from uniformly chosen episodes, as one gather.

        sample_from_start=True: a segment starts at a uniform step of its episode, padded at the end.
        sample_from_start=False: a segment ends at a uniform step of its episode, padded at the start.
        Returns observations (B, T, 3, 64, 64) uint8, actions (B, T) int64, rewards (B, T) float32,
        ends (B, T) int64 in {0, 1}, mask (B, T) bool (True on real steps), index (B, T) int64 (where each step
        lies in the buffer, to look up what was computed once for every stored frame); padding is zeros.
        """
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        starts, lengths = self._episode_table()  # (E,), (E,)
        episode = torch.randint(0, len(starts), (batch_size,), device=self.device)  # (B,)
        length = lengths[episode]  # (B,)
        pivot = self._uniform_below(length)  # (B,) the step where the segment starts (or ends)
        steps = torch.arange(sequence_length, device=self.device)  # (T,)
        if sample_from_start:
            offset = pivot[:, None] + steps  # (B, T) step within the episode
        else:
            offset = pivot[:, None] - (sequence_length - 1) + steps  # (B, T)
        mask = (offset >= 0) & (offset < length[:, None])  # (B, T)
        index = torch.where(mask, starts[episode][:, None] + offset, 0).flatten()  # (B*T,); padding reads step 0
        padding = (~mask).flatten().nonzero().squeeze(1)  # rows of (B*T,) to zero
        batch = {}
        for name in FIELDS:
            # index_select is several times faster than advanced indexing on frames.
            value = self._data[name].index_select(0, index).index_fill_(0, padding, 0)  # (B*T, ...)
            batch[name] = value.view(batch_size, sequence_length, *value.shape[1:])  # (B, T, ...)
        batch["ends"] = batch["ends"].long()
        batch["mask"] = mask
        batch["index"] = index.view(batch_size, sequence_length)  # step of each entry in the buffer, 0 on padding
        return {k: v.to(device) for k, v in batch.items()} if device is not None else batch

    @property
    def observations(self) -> torch.Tensor:
        """Every stored frame x_t in order, (len, 3, 64, 64) uint8: a view, not a copy."""
        return self._data["observations"][: self._size]

    def last_frames(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last n frames of the episode being collected, left-padded with zeros: (n, 3, 64, 64) uint8 and a
        mask (n,) bool, True on real frames. All padding when no episode is open (the next step starts one)."""
        start = self._episode_starts[-1] if self._episode_open else self._size
        first = max(start, self._size - n)
        frames = torch.zeros((n, *self.obs_shape), dtype=torch.uint8, device=self.device)
        mask = torch.zeros(n, dtype=torch.bool, device=self.device)
        count = self._size - first
        if count > 0:
            frames[n - count :] = self._data["observations"][first : self._size]
            mask[n - count :] = True
        return frames, mask

    def sample_frames(self, batch_size: int, device: str | torch.device | None = None) -> torch.Tensor:
        """B frames drawn uniformly over all steps (tokenizer batches): (B, 3, 64, 64) uint8."""
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        index = torch.randint(0, self._size, (batch_size,), device=self.device)  # (B,)
        frames = self._data["observations"].index_select(0, index)  # (B, 3, 64, 64)
        return frames.to(device) if device is not None else frames

    # ---------------------------------------------------------------------------------------------------------
    # Saving and loading: a folder of chunk files, each appended once, atomically, with a checksum per field

    def save(self, path: str | Path) -> None:
        """Write the steps added since the last save to the folder `path` as one new chunk file (all steps when the
        buffer was never saved there): the cost is the new steps only, and what was saved before is never opened.

        After a resume that dropped steps, the chunk named by its first step replaces the one on disk holding the
        same steps first (os.replace is atomic); chunks past it, which no checkpoint names, are then deleted.
        """
        path = Path(path)
        start = self._saved if path == self._saved_to else 0
        if start == self._size and path == self._saved_to:
            return  # no new step (epochs after the collection epochs)
        path.mkdir(parents=True, exist_ok=True)
        # A copy: torch.save writes a view's whole storage, preallocated slack included.
        data = {name: t[start : self._size].to("cpu", copy=True) for name, t in self._data.items()}
        starts = [s for s in self._episode_starts if s >= start]
        atomic_save(
            {
                "format": FILE_FORMAT,
                "obs_shape": list(self.obs_shape),
                "start": start,
                **data,
                "episode_starts": torch.tensor(starts, dtype=torch.int64),
                "episode_open": self._episode_open,
                "crc32": {name: _crc32(t) for name, t in data.items()},
            },
            path / CHUNK_NAME.format(start),
        )
        for chunk in _chunk_files(path):
            if _chunk_start(chunk) > start:
                chunk.unlink()
        self._saved_to, self._saved = path, self._size

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        chunk_size: int = 10_000,
        num_steps: int | None = None,
    ) -> ReplayBuffer:
        """The dataset saved in the folder path (or the single file of iris-replay-v1), its first num_steps steps if
        given (the steps a checkpoint names: chunks past them are not read). A missing, truncated or corrupt chunk
        among those read raises an error naming it."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no replay folder or file at {path}")
        states, size = [], 0
        for file in _chunk_files(path) if path.is_dir() else [path]:
            if num_steps is not None and size >= num_steps:
                break
            state = _read_chunk(file)
            shape = states[0]["obs_shape"] if states else state["obs_shape"]
            if state.get("start", 0) != size or list(state["obs_shape"]) != list(shape):
                raise ValueError(
                    f"replay chunk {file} does not follow the {size} steps before it: a chunk is missing or foreign"
                )
            states.append(state)
            size += len(state["actions"])
        if num_steps is not None and size < num_steps:
            raise ValueError(f"the replay at {path} holds {size} steps, fewer than the {num_steps} asked for")
        buffer = cls(tuple(states[0]["obs_shape"]) if states else (3, 64, 64), chunk_size=chunk_size, device=device)
        if size:
            buffer._grow(size)
        for state in states:
            start, stop = state.get("start", 0), state.get("start", 0) + len(state["actions"])
            for name in FIELDS:
                buffer._data[name][start:stop] = state[name]
            buffer._episode_starts += state["episode_starts"].tolist()
        buffer._size = size
        buffer._episode_open = bool(states[-1]["episode_open"]) if states else False
        if size and buffer._episode_starts[:1] != [0]:
            raise ValueError(f"replay at {path} is corrupt and was not loaded: its first step starts no episode")
        if path.is_dir():  # the next save appends after the last whole chunk kept
            bounds = [state["start"] for state in states] + [size]
            buffer._saved_to, buffer._saved = path, max(b for b in bounds if b <= min(size, num_steps or size))
        if num_steps is not None:
            buffer.truncate(num_steps)
        return buffer


def _chunk_files(path: Path) -> list[Path]:
    return sorted(path.glob(CHUNK_NAME.replace("{:010d}", "*")), key=_chunk_start)


def _chunk_start(path: Path) -> int:
    return int(path.stem.split("_")[-1])


def _read_chunk(path: Path) -> dict[str, Any]:
    try:
        # mmap: the frames are read from the file straight into the new buffer, not held twice in memory.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"replay file {path} is truncated or corrupt and was not loaded ({error})") from error
    try:
        problem = _check_state(state)
    except Exception as error:  # a field of the wrong type, a missing checksum...
        problem = f"malformed content ({error!r})"
    if problem:
        raise ValueError(f"replay file {path} is corrupt and was not loaded: {problem}")
    return state


def _check_state(state: Any) -> str:
    """What is wrong with a loaded chunk's content, or '' if nothing is."""
    keys = {"format", "obs_shape", "episode_starts", "episode_open", "crc32", *FIELDS}
    if not isinstance(state, dict) or not keys <= state.keys() or state["format"] != FILE_FORMAT:
        return f"not an {FILE_FORMAT} file"
    size, start = len(state["actions"]), state.get("start", 0)
    if tuple(state["observations"].shape[1:]) != tuple(state["obs_shape"]):
        return f"frames of shape {tuple(state['observations'].shape[1:])}, expected {tuple(state['obs_shape'])}"
    for name in FIELDS:
        t = state[name]
        if t.dtype != DTYPES[name] or len(t) != size:
            return f"field {name} has {t.dtype} of length {len(t)}, expected {DTYPES[name]} of length {size}"
        if _crc32(t) != state["crc32"][name]:
            return f"checksum mismatch in {name}"
    starts = state["episode_starts"]
    valid = len(starts) == 0 or (
        starts[0] >= start and bool((starts[1:] > starts[:-1]).all()) and starts[-1] < start + size
    )
    return "" if valid else "inconsistent episode boundaries"
