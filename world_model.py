"""The world model's Transformer G (Section 2.2, Eqs. (1)-(3); Appendix A.2, Table 4) and the imagination MDP
that G and the discrete autoencoder (E, D) form together (Section 2.3; Algorithm 1, update_behavior).

G is a GPT-2-style Transformer in the manner of minGPT over the interleaved sequence
(z_0^1, ..., z_0^K, a_0, z_1^1, ..., z_t^K, a_t) of at most L(K + 1) tokens. At every position whose next token is
a frame token it predicts that token, Eq. (1); at every action token a_t it predicts the reward r_t, Eq. (2), and
the episode end d_t, Eq. (3).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import Tokenizer

MLP_RATIO = 4  # hidden width of the per-position MLP in units of D (GPT-2, minGPT)
INIT_STD = 0.02  # std of the normal init of Linear and Embedding weights (minGPT, reference code)
REWARD_CLASSES = 3  # sign of the reward, -1 / 0 / +1, the authors' choice for Atari (reference code)
END_CLASSES = 2  # d_t in {0, 1}
IGNORE_INDEX = -100  # cross-entropy label of a position that has nothing to predict


@dataclass
class WorldModelConfig:
    max_timesteps: int = 20  # L, Table 4
    embed_dim: int = 256  # D, Table 4
    num_layers: int = 10  # M, Table 4
    num_heads: int = 4  # attention heads, Table 4
    embed_dropout: float = 0.1  # embedding dropout, Table 4
    attn_dropout: float = 0.1  # attention dropout, Table 4
    resid_dropout: float = 0.1  # residual dropout, Table 4
    weight_decay: float = 0.01  # weight decay, Table 4
    reward_loss: str = "ce"  # Section 2.2: "ce" = cross-entropy on sign(r_t) (Atari), "mse" = regression of r_t


class KVCache:
    """Keys and values of every layer for the tokens already seen, so that imagination feeds one token at a time.

    Each layer's buffers hold the whole context of L(K + 1) tokens; they are allocated at the first write (with the
    batch size, dtype and device of the keys) and then written in place, never grown.
    """

    def __init__(self, num_layers: int, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # tokens in the cache; a Python int, so reading it never syncs host and device

    def reset(self) -> None:
        self.length = 0  # the buffers are kept and overwritten

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) after the cached tokens; return all keys and values (B, nh, length + T, hs)."""
        end = self.length + k.size(2)
        buffer = self.keys[layer]
        if self.length == 0 and (
            buffer is None or buffer.shape[:2] != k.shape[:2] or buffer.dtype != k.dtype or buffer.device != k.device
        ):
            shape = (k.size(0), k.size(1), self.max_tokens, k.size(3))  # (B, nh, L(K+1), hs)
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: WorldModelConfig) -> None:
        super().__init__()
        assert config.embed_dim % config.num_heads == 0, "D must be divisible by the number of heads"
        self.num_heads = config.num_heads
        self.attn_dropout = config.attn_dropout
        # One fused Linear for q, k, v (minGPT); the reference code has three, the same parameters and function.
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.resid_drop = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)
            for t in self.qkv(x).split(C, dim=2)
        )
        start = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, nh, start + T, hs)
        dropout = self.attn_dropout if self.training else 0.0
        if start == 0:  # plain causal attention (flash attention on CUDA)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif T == 1:  # one new token attends to the whole past: no mask needed
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # new token i sits at absolute position start + i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, D)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """GPT-2 block: x + attn(LN(x)), then x + MLP(LN(x)) (Appendix A.2)."""

    def __init__(self, config: WorldModelConfig) -> None:
        super().__init__()
        D = config.embed_dim
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = CausalSelfAttention(config)
        self.mlp = nn.Sequential(
            nn.Linear(D, MLP_RATIO * D), nn.GELU(), nn.Linear(MLP_RATIO * D, D), nn.Dropout(config.resid_dropout)
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


def mlp_head(embed_dim: int, out_dim: int) -> nn.Sequential:
    # The reference code's heads (eloialonso/iris, src/models/world_model.py): Linear(D, D), ReLU, Linear(D, out).
    return nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, out_dim))


def interleave(obs_tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """(z_t (B, T, K), a_t (B, T)) -> (z_0^1, ..., z_0^K, a_0, z_1^1, ...) (B, T(K+1))."""
    return torch.cat([obs_tokens, actions.unsqueeze(-1).to(obs_tokens.dtype)], dim=-1).flatten(1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real entries; 0 (with grad) when there are none, so padding never produces NaN."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


class WorldModel(nn.Module):
    """The Transformer G with its three heads: transitions, Eq. (1); rewards, Eq. (2); terminations, Eq. (3)."""

    def __init__(self, config: WorldModelConfig, vocab_size: int, tokens_per_frame: int, num_actions: int) -> None:
        super().__init__()
        assert config.reward_loss in ("ce", "mse"), f"reward_loss must be 'ce' or 'mse', not {config.reward_loss!r}"
        self.config = config
        self.vocab_size, self.tokens_per_frame, self.num_actions = vocab_size, tokens_per_frame, num_actions  # N, K, A
        self.max_tokens = config.max_timesteps * (tokens_per_frame + 1)  # L(K+1)
        D = config.embed_dim
        self.frame_embedding = nn.Embedding(vocab_size, D)  # N x D table
        self.action_embedding = nn.Embedding(num_actions, D)  # A x D table
        self.position_embedding = nn.Embedding(self.max_tokens, D)
        self.drop = nn.Dropout(config.embed_dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.ln_f = nn.LayerNorm(D)
        self.head_observations = mlp_head(D, vocab_size)
        self.head_rewards = mlp_head(D, REWARD_CLASSES if config.reward_loss == "ce" else 1)
        self.head_ends = mlp_head(D, END_CLASSES)
        self.apply(init_weights)

    def empty_cache(self) -> KVCache:
        return KVCache(len(self.blocks), self.max_tokens)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Interleaved tokens (B, T), the first at absolute position cache.length (0 without a cache), -> (B, T, D).

        Every K+1-th position, counted from the start of the context, is an action token. With a cache, the new
        tokens attend to the cached ones and their keys/values are appended to it.
        """
        start = 0 if cache is None else cache.length
        T = tokens.size(1)
        if start + T > self.max_tokens:
            raise ValueError(f"{start} + {T} tokens exceed the context of L(K+1) = {self.max_tokens} tokens")
        positions = torch.arange(start, start + T, device=tokens.device)  # absolute positions in the context
        is_action = (positions % (self.tokens_per_frame + 1) == self.tokens_per_frame).unsqueeze(-1)  # (T, 1)
        frames = self.frame_embedding(tokens.masked_fill(is_action.squeeze(-1), 0))  # (B, T, D)
        actions = self.action_embedding(tokens.masked_fill(~is_action.squeeze(-1), 0))  # (B, T, D)
        x = self.drop(torch.where(is_action, actions, frames) + self.position_embedding(positions))
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def loss(
        self,
        obs_tokens: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        ends: torch.Tensor,
        mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Eqs. (1)-(3) on a segment of T <= L steps: cross-entropy for every next frame token given all previous
        tokens, for r_t (sign, or MSE) and for d_t at each action token. Padded steps (mask False) add nothing.

        obs_tokens z_t (B, T, K) int64, actions a_t (B, T), rewards r_t (B, T), ends d_t (B, T), mask (B, T) bool.
        """
        B, T, K = obs_tokens.shape
        mask = mask.bool()
        ends = ends.long() * mask  # an end in padding is no end
        if bool((ends.sum(dim=1) > 1).any()):
            raise ValueError(
                "a world-model segment holds at most one episode end (d_t = 1); the replay buffer must "
                "not sample segments that span episodes"
            )
        tokens = interleave(obs_tokens, actions)  # (B, T(K+1))
        hidden = self(tokens)  # (B, T(K+1), D)

        # Eq. (1): position p predicts token p + 1 when that token is a frame token of a real step. Differs from the
        # reference code: the prediction must also be made from a real step, so a frame that follows left padding
        # is not predicted from the padding.
        step_mask = mask.repeat_interleave(K + 1, dim=1)  # (B, T(K+1)): is the step of each token real?
        is_frame = torch.arange(T * (K + 1), device=tokens.device) % (K + 1) != K  # (T(K+1),)
        label_mask = is_frame[1:] & step_mask[:, 1:] & step_mask[:, :-1]  # (B, T(K+1) - 1)
        labels = tokens[:, 1:].masked_fill(~label_mask, IGNORE_INDEX)
        logits = self.head_observations(hidden[:, :-1])  # (B, T(K+1) - 1, N)
        transition = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ) / label_mask.sum().clamp(min=1)

        action_hidden = hidden.view(B, T, K + 1, -1)[:, :, K]  # (B, T, D): outputs at the action tokens a_t
        reward_out = self.head_rewards(action_hidden)  # (B, T, 3) or (B, T, 1)
        if self.config.reward_loss == "ce":  # Eq. (2), classes 0 / 1 / 2 for r_t < 0 / = 0 / > 0
            reward_labels = (torch.sign(rewards) + 1).long()  # (B, T)
            reward_terms = F.cross_entropy(reward_out.transpose(1, 2), reward_labels, reduction="none")
        else:  # Eq. (2) as a regression (Section 2.2)
            reward_terms = (reward_out.squeeze(-1) - rewards.float()) ** 2
        reward = masked_mean(reward_terms, mask)
        termination = masked_mean(
            F.cross_entropy(self.head_ends(action_hidden).transpose(1, 2), ends, reduction="none"), mask
        )  # Eq. (3)
        return {
            "total": transition + reward + termination,
            "transition": transition,
            "reward": reward,
            "termination": termination,
        }

    def configure_optimizer(
        self, learning_rate: float, betas: tuple[float, float], fused: bool = False
    ) -> torch.optim.Optimizer:
        """AdamW as in minGPT: weight decay on Linear weights only; none on biases, LayerNorms or embeddings."""
        decay = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        decay_ids = {id(p) for p in decay}
        no_decay = [p for p in self.parameters() if id(p) not in decay_ids]
        groups = [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)


def init_weights(module: nn.Module) -> None:
    # minGPT / reference code init. Differs from minGPT: no extra 1/sqrt(2M) scaling of the residual
    # projections, as in the reference code.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def sample(logits: torch.Tensor) -> torch.Tensor:
    """One draw per row of softmax(logits) (..., C) -> (...) int64, without host-device sync.

    Gumbel-max: argmax(logits - log E) with E ~ Exp(1), the same draw torch.multinomial makes for one sample,
    minus its input check, which calls .item(). Differs from the reference code (Categorical(logits).sample(),
    whose argument validation syncs): same distribution, different random stream.
    """
    logits = logits.float()  # bf16 logits under autocast: draw in fp32, so rare classes keep their probability
    return torch.argmax(logits - torch.empty_like(logits).exponential_().log(), dim=-1)


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Dropout off inside; afterwards every submodule gets back its own previous mode."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class WorldModelEnv:
    """The imagination MDP of Section 2.3 for B parallel trajectories: reset from real frames, then step(actions).

    Each call runs the tokenizer and G in eval mode (dropout off) and restores their previous modes, so the caller
    need not switch modes (differs from the reference code, which puts both in eval mode once, for good).
    Rewards, ends and frames stay on the device (differs from the reference code, which returns numpy arrays):
    the step loop never syncs with the host. decode=False still samples ẑ_{t+1} (the next step needs it).
    """

    def __init__(self, tokenizer: Tokenizer, world_model: WorldModel) -> None:
        self.tokenizer, self.world_model = tokenizer, world_model
        self.cache = world_model.empty_cache()
        self.tokens: torch.Tensor | None = None  # z_t of the current frame, (B, K)

    @torch.no_grad()
    def reset(self, frames: torch.Tensor) -> torch.Tensor:
        """Real frames x_0 (B, 3, 64, 64), uint8 or float -> x̂_0 = D(E(x_0)) (B, 3, 64, 64) float in [0, 1]."""
        with eval_mode(self.tokenizer):
            return self.reset_from_tokens(self.tokenizer.encode(frames))  # z_0 = E(x_0), (B, K)

    @torch.no_grad()
    def reset_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens z_0 = E(x_0) (B, K) already computed (e.g. once per epoch for the whole dataset) -> x̂_0 = D(z_0)."""
        with eval_mode(self.tokenizer, self.world_model):
            self.tokens = tokens  # z_0, (B, K)
            self._refill_cache()
            return self.tokenizer.decode(self.tokens)

    def _refill_cache(self) -> None:
        # The cache starts over from the current frame's K tokens, as in the reference code.
        self.cache.reset()
        self.world_model(self.tokens, self.cache)

    @torch.no_grad()
    def step(
        self, actions: torch.Tensor, decode: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """a_t (B,) int64 -> r̂_t (B,) float32, d̂_t (B,) float32 0/1, x̂_{t+1} = D(ẑ_{t+1}) (B, 3, 64, 64) or None.

        Samples r̂_t and d̂_t at the action token, then the K tokens of ẑ_{t+1} one at a time, Eq. (1).
        """
        assert self.tokens is not None, "call reset(frames) first"
        wm, K = self.world_model, self.world_model.tokens_per_frame
        with eval_mode(self.tokenizer, wm):
            if self.cache.length + K + 1 > wm.max_tokens:  # this step's K+1 tokens would not fit the context
                self._refill_cache()
            hidden = wm(actions.to(self.tokens.device).long().view(-1, 1), self.cache)[:, -1]  # output at a_t (B, D)
            reward_out = wm.head_rewards(hidden)  # (B, 3) or (B, 1)
            if wm.config.reward_loss == "ce":
                rewards = (sample(reward_out) - 1).float()  # Eq. (2): class 0 / 1 / 2 -> r̂_t = -1 / 0 / +1
            else:  # the regression of Section 2.2, absent from the reference code
                rewards = reward_out.squeeze(-1).float()  # Eq. (2): the predicted mean
            ends = sample(wm.head_ends(hidden)).float()  # Eq. (3)
            next_tokens = torch.empty_like(self.tokens)  # ẑ_{t+1}, (B, K)
            for k in range(K):  # Eq. (1): ẑ^{k+1}_{t+1} ~ p_G(. | z_≤t, a_≤t, ẑ^{≤k}_{t+1})
                next_tokens[:, k] = sample(wm.head_observations(hidden))
                hidden = wm(next_tokens[:, k : k + 1], self.cache)[:, -1]  # the last pass only fills the cache
            self.tokens = next_tokens
            frames = self.tokenizer.decode(next_tokens) if decode else None
        return rewards, ends, frames
