"""Actor-critic trained in imagination: Section 2.3, Appendix A.3 (network), Appendix B (objectives), Algorithm 1.

The policy π and value V share a convolutional encoder and an LSTM cell and differ only in their last linear layers.
They always see reconstructed frames x̂ = D(E(x)), in imagination and in the real environment alike (Algorithm 1).
Before imagining from a real frame, the LSTM state is burnt in (Kapturowski et al., 2019) on the frames before it.

The LSTM state is functional: every call takes a state (h, c) and returns the new one, so the caller owns it
(one state per real environment in collection, one per trajectory in imagination).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from tokenizer import Tokenizer
from world_model import WorldModelEnv, sample

State = tuple[torch.Tensor, torch.Tensor]  # LSTM (h, c), each (B, lstm_dim)
BOOTSTRAPS = ("paper", "reference")  # values of ActorCriticConfig.bootstrap


@dataclass
class ActorCriticConfig:
    conv_channels: tuple[int, ...] = (32, 32, 64, 64)  # one 3x3 conv + 2x2 max-pool per entry, Appendix A.3
    lstm_dim: int = 512  # LSTM hidden state dimension, Appendix A.3
    burn_in: int = 20  # frames before x_0 that set the LSTM state, Appendix A.3
    imagination_horizon: int = 20  # H, Table 6
    gamma: float = 0.995  # γ, Table 6
    lam: float = 0.95  # λ, Table 6
    entropy_weight: float = 0.001  # η, Table 6
    # The authors' code, where it departs from the paper (README "Where this differs from the reference"):
    bootstrap: str = "paper"  # "paper": Λ_H = V(x̂_H), H steps trained, Eq. (4); "reference": Λ_{H-1} = V(x̂_{H-1})
    train_after_end: bool = False  # True: steps after an imagined end keep their weight, as in the authors' code


class ActorCritic(nn.Module):
    """π(a_t | x̂_≤t) and V(x̂_t): conv block -> LSTM cell -> two linear heads (Appendix A.3)."""

    def __init__(self, config: ActorCriticConfig, num_actions: int, frame_size: int) -> None:
        super().__init__()
        self.config = config
        self.num_actions = num_actions
        self.frame_shape = (3, frame_size, frame_size)  # (C, h, w) of x̂_t: env.frame_size, 64 in Table 2
        layers: list[nn.Module] = []
        in_channels = 3
        for channels in config.conv_channels:
            # Appendix A.3: 3x3 conv (stride 1, padding 1), ReLU, 2x2 max-pool (stride 2); each halves h and w.
            layers += [nn.Conv2d(in_channels, channels, 3, stride=1, padding=1), nn.ReLU(), nn.MaxPool2d(2, stride=2)]
            in_channels = channels
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        side = frame_size // 2 ** len(config.conv_channels)  # 64 -> 4 with four poolings
        self.lstm = nn.LSTMCell(in_channels * side * side, config.lstm_dim)  # 1024 -> 512 with the paper's config
        self.actor_head = nn.Linear(config.lstm_dim, num_actions)  # logits of π
        self.critic_head = nn.Linear(config.lstm_dim, 1)  # V

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """Zero LSTM state for batch_size episodes or trajectories."""
        zeros = torch.zeros(batch_size, self.config.lstm_dim, device=device)
        return zeros, zeros.clone()

    def reset_state(self, state: State, mask: torch.Tensor) -> State:
        """Zero the rows of state where mask (B,) is True, e.g. the environments that just started an episode."""
        keep = torch.logical_not(torch.as_tensor(mask, device=state[0].device)).unsqueeze(-1)  # (B, 1)
        return state[0] * keep, state[1] * keep

    def _features(self, frames: torch.Tensor) -> torch.Tensor:
        # Follows the reference code: frames in [0, 1] are rescaled to [-1, 1] before the convolutions.
        return self.encoder(frames.mul(2).sub(1))  # (B, 1024)

    def _recur(self, features: torch.Tensor, state: State, mask: torch.Tensor | None) -> State:
        h, c = self.lstm(features, state)
        if mask is not None:  # padded rows keep their previous state
            keep = mask.unsqueeze(-1)  # (B, 1)
            h, c = torch.where(keep, h, state[0]), torch.where(keep, c, state[1])
        return h, c

    def forward(
        self, frames: torch.Tensor, state: State, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """One step on x̂_t (B, 3, 64, 64) in [0, 1] -> logits (B, A), values V(x̂_t) (B,), new state."""
        assert frames.shape[1:] == self.frame_shape, frames.shape
        h, c = self._recur(self._features(frames), state, mask)
        return self.actor_head(h), self.critic_head(h).squeeze(-1), (h, c)

    @torch.no_grad()
    def burn_in(self, frames: torch.Tensor, mask: torch.Tensor) -> State:
        """LSTM state after the reconstructed frames (B, T, 3, 64, 64) in [0, 1]; padded steps (mask False) skipped."""
        batch_size, steps = mask.shape
        # All B*T frames go through the conv block at once; only the LSTM needs the loop over time.
        features = self._features(frames.flatten(0, 1)).unflatten(0, (batch_size, steps))  # (B, T, 1024)
        state = self.initial_state(batch_size, frames.device)
        for t in range(steps):
            state = self._recur(features[:, t], state, mask[:, t])
        return state

    @torch.no_grad()
    def act(
        self, frames: torch.Tensor, state: State, tokenizer: Tokenizer, temperature: float = 1.0, epsilon: float = 0.0
    ) -> tuple[torch.Tensor, State]:
        """Actions (B,) int64 for real frames (B, 3, 64, 64) uint8 (collect_experience of Algorithm 1).

        a_t ~ softmax(logits / temperature), temperature 0 meaning argmax; then with probability epsilon per row,
        a uniformly random action instead (ε-greedy, Table 5).
        """
        reconstructions = tokenizer.encode_decode(frames)  # x̂_t = D(E(x_t)): the policy only ever sees x̂
        logits, _, state = self(reconstructions, state)
        actions = logits.argmax(-1) if temperature == 0 else sample(logits / temperature)
        explore = torch.rand(actions.shape, device=actions.device) < epsilon  # (B,)
        random_actions = torch.randint_like(actions, self.num_actions)
        return torch.where(explore, random_actions, actions), state


@dataclass
class ImagineOutput:
    actions: torch.Tensor  # a_t, (B, H) int64
    logits: torch.Tensor  # logits of π(a_t | x̂_≤t), (B, H, A), with grad
    values: torch.Tensor  # V(x̂_t) for t = 0..H (the last one is the bootstrap), (B, H + 1), with grad
    rewards: torch.Tensor  # r̂_t, (B, H) float32
    ends: torch.Tensor  # d̂_t, (B, H) float32 0/1
    frames: torch.Tensor  # x̂_0..x̂_H, (B, H + 1, 3, 64, 64) float in [0, 1], no grad (for media)


def imagine(
    actor_critic: ActorCritic,
    wm_env: WorldModelEnv,
    frames: torch.Tensor,
    mask: torch.Tensor,
    horizon: int,
    tokens: torch.Tensor | None = None,
) -> ImagineOutput:
    """Roll out B imagined trajectories of H steps (update_behavior of Algorithm 1).

    frames (B, burn_in + 1, 3, 64, 64) uint8 are real segments whose last frame is x_0 (mask (B, burn_in + 1) bool,
    True on real steps; x_0 must be real). The first burn_in frames, reconstructed, set the LSTM state (Appendix A.3).
    tokens (B, burn_in + 1, K), if given, are E(frames) computed beforehand (once per epoch for the whole dataset):
    the same numbers without encoding the frames again.
    """
    batch_size = frames.size(0)
    burn_in_mask = mask[:, :-1]
    if tokens is None:
        with torch.no_grad():
            tokens = wm_env.tokenizer.encode(frames)  # z = E(x), one batched call, (B, burn_in + 1, K)
    if burn_in_mask.size(1) > 0:
        with torch.no_grad():  # one batched D(z) for all B * burn_in frames
            reconstructions = wm_env.tokenizer.decode(tokens[:, :-1])  # x̂ = D(E(x)), (B, burn_in, 3, 64, 64)
        state = actor_critic.burn_in(reconstructions, burn_in_mask)
    else:
        state = actor_critic.initial_state(batch_size, frames.device)

    frame = wm_env.reset_from_tokens(tokens[:, -1])  # x̂_0 = D(E(x_0))
    all_frames, all_actions, all_logits, all_values, all_rewards, all_ends = [frame], [], [], [], [], []
    for _ in range(horizon):
        logits, value, state = actor_critic(frame, state)
        action = sample(logits)  # a_t ~ π(a_t | x̂_≤t), Gumbel-max: no host-device sync
        reward, end, frame = wm_env.step(action)  # r̂_t, d̂_t, x̂_{t+1} ~ p_G
        all_frames.append(frame)
        all_actions.append(action)
        all_logits.append(logits)
        all_values.append(value)
        all_rewards.append(reward)
        all_ends.append(end)
    _, last_value, _ = actor_critic(frame, state)  # V(x̂_H), the bootstrap of Eq. (4) (x̂_H is decoded for it)
    all_values.append(last_value)

    return ImagineOutput(
        actions=torch.stack(all_actions, dim=1),  # (B, H)
        logits=torch.stack(all_logits, dim=1).float(),  # (B, H, A), fp32 for the losses even under bf16 autocast
        values=torch.stack(all_values, dim=1).float(),  # (B, H + 1)
        rewards=torch.stack(all_rewards, dim=1).float(),  # (B, H)
        ends=torch.stack(all_ends, dim=1).float(),  # (B, H)
        frames=torch.stack(all_frames, dim=1),  # (B, H + 1, 3, 64, 64)
    )


def compute_lambda_returns(
    rewards: torch.Tensor, values: torch.Tensor, ends: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """λ-returns Λ_t, t = 0..H-1, (B, H), from r̂_t (B, H), d̂_t (B, H) and V(x̂_t), t = 0..H, (B, H + 1).

    Eq. (4): Λ_t = r̂_t + γ(1 - d̂_t)[(1 - λ)V(x̂_{t+1}) + λΛ_{t+1}] for t < H, and Λ_H = V(x̂_H).
    Differs from the reference code: there Λ_{H-1} = V(x̂_{H-1}) (r̂_{H-1} and x̂_H are never used), and π and V
    learn on H - 1 steps; here all H steps of Eq. (4), with H + 1 values.
    """
    horizon = rewards.size(1)
    assert values.size(1) == horizon + 1 and ends.shape == rewards.shape, (rewards.shape, values.shape, ends.shape)
    discounts = gamma * (1 - ends.to(values.dtype))  # γ(1 - d̂_t), (B, H)
    returns = torch.empty_like(rewards, dtype=values.dtype)
    next_return = values[:, -1]  # Λ_H = V(x̂_H)
    for t in reversed(range(horizon)):
        # Eq. (4)
        next_return = rewards[:, t] + discounts[:, t] * ((1 - lam) * values[:, t + 1] + lam * next_return)
        returns[:, t] = next_return
    return returns


def alive_mask(ends: torch.Tensor) -> torch.Tensor:
    """1 for the steps at or before the first imagined end d̂_t = 1, 0 after it, (B, H) float."""
    not_ended = torch.cumprod(1 - ends.float(), dim=1)  # Π_{s<=t} (1 - d̂_s), (B, H)
    return torch.cat([torch.ones_like(not_ended[:, :1]), not_ended[:, :-1]], dim=1)  # Π_{s<t} (1 - d̂_s)


def actor_critic_loss(out: ImagineOutput, config: ActorCriticConfig) -> dict[str, torch.Tensor]:
    """Value loss, Eq. (5), and REINFORCE policy loss with entropy bonus, Eq. (6), on an imagined rollout."""
    if config.bootstrap not in BOOTSTRAPS:
        raise ValueError(f"actor_critic.bootstrap must be one of {', '.join(BOOTSTRAPS)}, got {config.bootstrap!r}")
    if config.bootstrap == "reference":  # the authors' code: Λ_{H-1} = V(x̂_{H-1}); r̂_{H-1} and x̂_H go unused
        out = ImagineOutput(
            out.actions[:, :-1],
            out.logits[:, :-1],
            out.values[:, :-1],
            out.rewards[:, :-1],
            out.ends[:, :-1],
            out.frames[:, :-1],
        )
    batch_size, horizon = out.actions.shape
    values = out.values[:, :-1]  # V(x̂_t), t < H, (B, H)
    with torch.no_grad():
        lambda_returns = compute_lambda_returns(out.rewards, out.values, out.ends, config.gamma, config.lam)  # sg(Λ_t)
        alive = alive_mask(out.ends)  # (B, H)
        # The paper stops the episode at an imagined end: later steps carry no weight in Eqs. (5)-(6).
        # Differs from the paper: the sums over t of Eqs. (5)-(6) are divided by H (the reference code averages
        # over steps), so each loss is a mean over the B * H steps, the masked ones counting as zero.
        # Differs from the reference code: it also trains on the steps after an imagined end (train_after_end).
        weights = (torch.ones_like(alive) if config.train_after_end else alive) / (batch_size * horizon)  # (B, H)
        advantages = lambda_returns - values  # sg(Λ_t - V(x̂_t)), the baseline of Eq. (6)

    log_probs = out.logits.log_softmax(dim=-1)  # log π(· | x̂_≤t), (B, H, A)
    log_probs_actions = log_probs.gather(-1, out.actions.unsqueeze(-1)).squeeze(-1)  # log π(a_t | x̂_≤t), (B, H)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)  # H(π(· | x̂_≤t)), (B, H)

    value_loss = (weights * (values - lambda_returns).square()).sum()  # Eq. (5)
    policy_loss = -(weights * log_probs_actions * advantages).sum()  # Eq. (6), REINFORCE with V as baseline
    entropy_loss = -config.entropy_weight * (weights * entropy).sum()  # Eq. (6), the -η H(π) term
    return {
        "total": value_loss + policy_loss + entropy_loss,
        "value": value_loss,
        "policy": policy_loss,
        "entropy": entropy_loss,
        "imagined_return": (out.rewards * alive).sum(dim=1).mean().detach(),  # undiscounted, up to the first end
        "mean_entropy": ((alive * entropy).sum() / alive.sum()).detach(),
        "lambda_return": ((alive * lambda_returns).sum() / alive.sum()).detach(),
    }
