"""Discrete autoencoder (E, D, codebook) of IRIS: Section 2.1, Appendix A.1, Tables 2 and 3.

The world model only ever sees frames through this autoencoder, and the policy only ever sees its
reconstructions x̂ = D(E(x)). The CNNs follow the VQGAN encoder/decoder (taming-transformers) that the
authors' code uses, without the discriminator: a VQ-VAE with an extra perceptual loss.
"""

import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


RECONSTRUCTION_LOSSES = ("l1", "l2")  # values of TokenizerConfig.reconstruction_loss


@dataclass
class TokenizerConfig:
    resolution: int = 64  # (h, w) = 64 x 64, Table 2
    in_channels: int = 3  # RGB frames
    ch: int = 64  # channels in convolutions, Table 2
    ch_mult: tuple[int, ...] = (1, 1, 1, 1, 1)  # channels per resolution level; len - 1 = 4 layers (64 -> 4), Table 2
    num_res_blocks: int = 2  # residual blocks per layer, Table 2
    attn_resolutions: tuple[int, ...] = (8, 16)  # self-attention layers at resolution 8 / 16, Table 2
    z_channels: int = 512  # encoder output channels, reference code
    vocab_size: int = 512  # N, Table 3
    embed_dim: int = 512  # d, Table 3
    dropout: float = 0.0  # in residual blocks, reference code
    num_groups: int = 32  # GroupNorm groups, taming-transformers (smaller for tiny configs with few channels)
    perceptual_weight: float = 1.0  # weight of L_perceptual, equal weighting (Appendix A.1); 0 trains without it
    reconstruction_loss: str = "l1"  # "l1": ||x - D(z)||_1, Appendix A.1; "l2": squared error (README "Does it learn?")
    perceptual_dropout: float = 0.0  # LPIPS's dropout before lin0..lin4 while E, D train; 0.5 as the reference code
    pretrained_vgg: bool = True  # ImageNet VGG16 trunk of L_perceptual; False = random weights, for tests only

    @property
    def tokens_per_frame(self) -> int:
        """K = 16, Table 3: one token per cell of the encoder's output grid."""
        return self.latent_resolution**2

    @property
    def latent_resolution(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)


# ----------------------------------------------------------------------------------------------------------------------
# Encoder E and decoder D (VQGAN style, Table 2)


def group_norm(channels: int, config: TokenizerConfig) -> nn.GroupNorm:
    # Differs from the reference code: the group count is a config field (fixed 32 there), capped by the channels.
    return nn.GroupNorm(min(config.num_groups, channels), channels, eps=1e-6)  # eps as in taming-transformers


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, config: TokenizerConfig) -> None:
        super().__init__()
        self.body = nn.Sequential(
            group_norm(in_channels, config),
            nn.SiLU(),  # Swish
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels, config),
            nn.SiLU(),
            nn.Dropout(config.dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over the h * w positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, config: TokenizerConfig) -> None:
        super().__init__()
        self.norm = group_norm(channels, config)
        # Differs from the reference code: its three 1x1 convs q, k, v are fused into one (same parameters).
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (B, h*w, 3C)
        q, k, v = qkv.chunk(3, dim=-1)  # each (B, h*w, C)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        y = y.transpose(1, 2).reshape(b, c, h, w)  # (B, C, h, w)
        return x + self.proj(y)


class Downsample(nn.Module):
    """Strided 3x3 conv halving the resolution; asymmetric padding as in taming-transformers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def middle_stage(channels: int, config: TokenizerConfig) -> list[nn.Module]:
    return [
        ResidualBlock(channels, channels, config),
        SelfAttention(channels, config),
        ResidualBlock(channels, channels, config),
    ]


def build_encoder(config: TokenizerConfig) -> nn.Sequential:
    """E's CNN: frames in [-1, 1] (B, 3, 64, 64) -> y (B, z_channels, 4, 4)."""
    channels, resolution = config.ch, config.resolution
    layers: list[nn.Module] = [nn.Conv2d(config.in_channels, channels, 3, padding=1)]
    for level, mult in enumerate(config.ch_mult):
        for _ in range(config.num_res_blocks):
            layers.append(ResidualBlock(channels, config.ch * mult, config))
            channels = config.ch * mult
            if resolution in config.attn_resolutions:
                layers.append(SelfAttention(channels, config))
        if level != len(config.ch_mult) - 1:
            layers.append(Downsample(channels))
            resolution //= 2
    layers += middle_stage(channels, config)
    layers += [group_norm(channels, config), nn.SiLU(), nn.Conv2d(channels, config.z_channels, 3, padding=1)]
    return nn.Sequential(*layers)


def build_decoder(config: TokenizerConfig) -> nn.Sequential:
    """D's CNN, mirroring E: (B, z_channels, 4, 4) -> frames in [-1, 1] (B, 3, 64, 64) (not clamped)."""
    channels, resolution = config.ch * config.ch_mult[-1], config.latent_resolution
    layers: list[nn.Module] = [nn.Conv2d(config.z_channels, channels, 3, padding=1)]
    layers += middle_stage(channels, config)
    for level in reversed(range(len(config.ch_mult))):
        # Differs from the paper (as the reference code): D has num_res_blocks + 1 = 3 residual blocks per layer,
        # where Table 2 says E's hyperparameters apply to D.
        for _ in range(config.num_res_blocks + 1):
            layers.append(ResidualBlock(channels, config.ch * config.ch_mult[level], config))
            channels = config.ch * config.ch_mult[level]
            if resolution in config.attn_resolutions:
                layers.append(SelfAttention(channels, config))
        if level != 0:
            layers.append(Upsample(channels))
            resolution *= 2
    layers += [group_norm(channels, config), nn.SiLU(), nn.Conv2d(channels, config.in_channels, 3, padding=1)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------------------------
# Perceptual loss: LPIPS (Zhang et al., 2018) with the VGG16 trunk, as the reference code


VGG16_STAGE_ENDS = (3, 8, 15, 22, 29)  # indices in vgg16().features of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1
LPIPS_CHANNELS = (64, 128, 256, 512, 512)  # VGG16 channels at the five stage ends, one linear layer each
# LPIPS's ScalingLayer, (x - shift) / scale on x in [-1, 1]: torchvision's ImageNet mean (0.485, 0.456, 0.406) and
# std (0.229, 0.224, 0.225) moved to [-1, 1] (shift = 2 mean - 1, scale = 2 std), as LPIPS writes them.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# Inside the lpips package (BSD-2); the same file (md5 d507d7349b931f0638a25a48a722f98a) the reference code downloads.
LPIPS_WEIGHTS = os.path.join("weights", "v0.1", "vgg.pth")
NORM_EPS = 1e-10  # LPIPS's epsilon when unit-normalising activations over channels


class PerceptualLoss(nn.Module):
    """L_perceptual (Appendix A.1): the LPIPS distance on frozen VGG16 features, as the reference code.

    d(x, y) = sum_l mean_{h,w} w_l . (n(φ_l(x)) - n(φ_l(y)))^2, with φ_l the VGG16 activations at relu1_2, relu2_2,
    relu3_3, relu4_3 and relu5_3, n the unit normalisation over channels and w_l >= 0 LPIPS's calibrated 1x1 linear
    layers lin0..lin4.
    The VGG16 trunk comes from torchvision; the linear layers from the lpips package (the file the reference code
    downloads, byte for byte).
    Differs from the reference code: always in eval mode. There LPIPS's dropout (p = 0.5) before the linear layers
    is active while the tokenizer trains (the trainer puts the whole agent in train mode); here it is left out
    unless TokenizerConfig.perceptual_dropout asks for it (the same expected distance, with noise).
    """

    def __init__(self, pretrained: bool) -> None:
        super().__init__()
        import torchvision  # here: importing it slows every script's start-up (README, Speed), most never need it

        lpips_path = lpips_weights_path()  # before VGG16, to fail fast
        weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1 if pretrained else None
        try:
            vgg = torchvision.models.vgg16(weights=weights)
        except Exception as err:  # offline: URLError; partial or corrupt file: RuntimeError
            raise RuntimeError(missing_vgg_message()) from err
        self.features = vgg.features[: VGG16_STAGE_ENDS[-1] + 1]
        self.lins = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for channels in LPIPS_CHANNELS)
        lpips_state = torch.load(lpips_path, map_location="cpu", weights_only=True)  # lin{l}.model.1.weight
        self.lins.load_state_dict({f"{i}.weight": lpips_state[f"lin{i}.model.1.weight"] for i in range(len(self.lins))})
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, -1, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)  # always in eval mode

    def forward(self, x: Tensor, y: Tensor, dropout: float = 0.0) -> Tensor:
        """x, y: (B, 3, H, W) in [-1, 1]. Returns the distance per image, (B,). dropout: LPIPS's, before each lin."""
        h = (torch.cat([x, y]) - self.shift) / self.scale  # one pass for both, (2B, 3, H, W)
        distance = x.new_zeros(x.shape[0])
        stage = 0
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in VGG16_STAGE_ENDS:
                h_x, h_y = unit_normalize(h).chunk(2)  # each (B, C, h, w)
                diff = F.dropout((h_x - h_y).pow(2), p=dropout, training=dropout > 0)  # (B, C, h, w)
                distance = distance + self.lins[stage](diff).mean(dim=(1, 2, 3))  # w_l . diff, mean over space
                stage += 1
        return distance


def unit_normalize(h: Tensor) -> Tensor:
    return h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + NORM_EPS)


def lpips_weights_path() -> str:
    """LPIPS's linear-layer weights for VGG16, in the installed lpips package (found, not imported: no side effects)."""
    spec = importlib.util.find_spec("lpips")
    path = None if spec is None or spec.origin is None else os.path.join(os.path.dirname(spec.origin), LPIPS_WEIGHTS)
    if path is None or not os.path.isfile(path):
        raise RuntimeError(
            f"The tokenizer's perceptual loss (LPIPS) needs the linear-layer weights {LPIPS_WEIGHTS} of the lpips "
            f"package, which is not installed: `pip install lpips`, or train without the perceptual term with "
            f"`--tokenizer.perceptual_weight 0` (TokenizerConfig(perceptual_weight=0.0))."
        )
    return path


def missing_vgg_message() -> str:
    filename = VGG16_URL.rsplit("/", 1)[-1]
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")  # where torch.hub.load_state_dict_from_url looks
    return (
        f"The tokenizer's perceptual loss needs torchvision's ImageNet VGG16 weights, which could not be loaded: "
        f"torchvision looks for the file {filename} in {folder} (downloaded from {VGG16_URL}). "
        f"Put that file there, or train without the perceptual term with `--tokenizer.perceptual_weight 0` "
        f"(TokenizerConfig(perceptual_weight=0.0))."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig = TokenizerConfig()) -> None:
        super().__init__()
        if config.reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"reconstruction_loss must be one of {', '.join(RECONSTRUCTION_LOSSES)}, not {config.reconstruction_loss!r}"
            )
        self.config = config
        self.encoder = build_encoder(config)
        self.pre_quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)  # codebook {e_i}, (N, d)
        nn.init.uniform_(self.embedding.weight, -1.0 / config.vocab_size, 1.0 / config.vocab_size)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = build_decoder(config)
        # Set with object.__setattr__ so VGG is no submodule: never in state_dict(), parameters() or an optimizer.
        object.__setattr__(self, "_perceptual", None)

    def encode(self, frames: Tensor) -> Tensor:
        """frames (..., 3, 64, 64), uint8 or float in [0, 1] -> tokens z (..., K) int64."""
        y = self._encode_continuous(self._preprocess(frames))
        return self._quantize(y).reshape(*frames.shape[:-3], -1)  # (..., K)

    def decode(self, tokens: Tensor) -> Tensor:
        """tokens z (..., K) -> frames D(z) (..., 3, 64, 64) float in [0, 1]."""
        z_q = self._embed(tokens.reshape(-1, tokens.shape[-1]))  # (B, d, h, w)
        frames = postprocess(self._decode_continuous(z_q)).clamp(0.0, 1.0)
        return frames.reshape(*tokens.shape[:-1], *frames.shape[1:])  # (..., 3, 64, 64)

    def encode_decode(self, frames: Tensor) -> Tensor:
        """The policy's view x̂ = D(E(x)), float in [0, 1].

        Differs from the reference code: not wrapped in torch.no_grad (the caller decides), clamped here.
        """
        return self.decode(self.encode(frames))

    def loss(self, frames: Tensor, pixel_weights: Tensor | None = None) -> dict[str, Tensor]:
        """Appendix A.1 objective, equally weighted terms:

        L(E, D, codebook) = ||x - D(z)||_1 + ||sg(E(x)) - e(z)||_2^2 + ||sg(e(z)) - E(x)||_2^2 + L_perceptual(x, D(z))

        pixel_weights (B, 1, 64, 64), if given, weight the first term per pixel (reconstruction_term; not the paper).
        """
        x = self._preprocess(frames)  # (B, 3, 64, 64) in [-1, 1]
        y = self._encode_continuous(x)  # E(x), (B, d, h, w)
        tokens = self._quantize(y)  # z, (B, K)
        z_q = self._embed(tokens)  # e(z), (B, d, h, w)
        decoder_input = y + (z_q - y).detach()  # straight-through estimator: D's gradient reaches E unchanged
        reconstruction = self._decode_continuous(decoder_input)  # D(z), (B, 3, 64, 64) in [-1, 1]

        # Differs from the paper (as the reference code): norms are averaged over elements, not summed, and L1 is
        # taken in the network's [-1, 1] space (twice the L1 in [0, 1]).
        error = x - reconstruction  # (B, 3, 64, 64)
        losses = {"reconstruction": self.reconstruction_term(error, pixel_weights)}  # Appendix A.1, term 1
        losses["codebook"], losses["commitment"] = commitment_losses(y, z_q)  # Appendix A.1, terms 2 and 3
        total = losses["reconstruction"] + losses["codebook"] + losses["commitment"]
        if self.config.perceptual_weight > 0:
            dropout = self.config.perceptual_dropout if self.training else 0.0
            distance = self.perceptual_net()(x, reconstruction, dropout)  # (B,), both in [-1, 1] as the reference
            losses["perceptual"] = distance.mean()  # Appendix A.1, term 4
            total = total + self.config.perceptual_weight * losses["perceptual"]
        else:
            losses["perceptual"] = total.new_zeros(()).detach()  # disabled: logged as 0 so the columns stay fixed
        losses["total"] = total
        losses.update(codebook_metrics(tokens, self.config.vocab_size))
        return losses

    def reconstruction_term(self, error: Tensor, pixel_weights: Tensor | None = None) -> Tensor:
        """Appendix A.1, term 1, of error = x - D(z) (B, 3, 64, 64): mean |error|, or mean squared error when
        reconstruction_loss = "l2"; each pixel's errors times pixel_weights (B, 1, 64, 64) if given.

        Differs from the paper when reconstruction_loss = "l2": without L_perceptual, the L1 term alone left small
        objects (a 16x16 ball, Pong's ball, Boxing's boxers) out of D's frames; squared errors learn them. Pixel
        weights are not the paper either: learn.py --foreground_weight, for Pong's one-pixel ball.
        """
        per_element = error.abs() if self.config.reconstruction_loss == "l1" else error.pow(2)  # (B, 3, 64, 64)
        return per_element.mean() if pixel_weights is None else (pixel_weights * per_element).mean()

    @torch.no_grad()
    def restart_unused_codes(self, frames: Tensor) -> int:
        """Move every code that no frame of the batch uses onto the encoder output y^k of a random token of the batch.

        Differs from the paper and the reference code, which have no restarts: without the perceptual loss, in small
        configs on Pong, the codebook collapses within tens of steps to one code per token position, the same for
        every frame, and had not recovered after hundreds of steps (learn.py). Random restarts of dead codes
        (Dhariwal et al., 2020, Jukebox) put codes back where the encoder outputs are; called every 5 steps they keep
        hundreds of codes in use, but on their own they did not make D use them within 1,350 steps. Off unless a
        training loop calls it (train.py does not). Returns the number of codes moved.
        """
        y = self._encode_continuous(self._preprocess(frames))  # (B, d, h, w)
        y_flat = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])  # (B*K, d)
        used = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=y.device)
        used[self._quantize(y).flatten()] = True
        dead = torch.nonzero(~used).squeeze(1)  # (n,)
        picks = torch.randint(len(y_flat), (len(dead),), device=y.device)
        self.embedding.weight[dead] = y_flat[picks]
        return len(dead)

    def perceptual_net(self) -> PerceptualLoss:
        """The frozen VGG of L_perceptual, built on first use (call it early to fail fast when offline)."""
        if self._perceptual is None:
            object.__setattr__(self, "_perceptual", PerceptualLoss(self.config.pretrained_vgg))
        device = self.embedding.weight.device
        if self._perceptual.shift.device != device:
            self._perceptual.to(device)
        return self._perceptual

    def _preprocess(self, frames: Tensor) -> Tensor:
        """(..., 3, 64, 64) uint8 or float in [0, 1] -> (B, 3, 64, 64) float in [-1, 1], as the reference code."""
        expected = (self.config.in_channels, self.config.resolution, self.config.resolution)
        if tuple(frames.shape[-3:]) != expected:
            raise ValueError(
                f"expected frames (..., {', '.join(map(str, expected))}), channels first; got {tuple(frames.shape)}"
            )
        x = frames.reshape(-1, *expected)  # (B, 3, 64, 64)
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return x * 2 - 1

    def _encode_continuous(self, x: Tensor) -> Tensor:
        return self.pre_quant_conv(self.encoder(x))  # y = E(x), (B, d, h, w)

    def _quantize(self, y: Tensor) -> Tensor:
        """z^k = argmin_i ||y^k - e_i||_2 (Section 2.1). y (B, d, h, w) -> tokens (B, K), k = row * w + column."""
        # argmin has no gradient: build no graph. fp32 even under autocast, so close codes are told apart.
        with torch.no_grad(), torch.autocast(y.device.type, enabled=False):
            y_flat = y.float().permute(0, 2, 3, 1).reshape(-1, y.shape[1])  # (B*K, d)
            e = self.embedding.weight.float()  # (N, d)
            # ||y - e||^2 = ||y||^2 + ||e||^2 - 2 y.e, without materialising the (B*K, N, d) differences
            distances = y_flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * y_flat @ e.t()  # (B*K, N)
            return distances.argmin(dim=1).reshape(y.shape[0], -1)  # (B, K)

    def _embed(self, tokens: Tensor) -> Tensor:
        """tokens (B, K) -> e(z) (B, d, h, w)."""
        side = self.config.latent_resolution
        return self.embedding(tokens).reshape(-1, side, side, self.config.embed_dim).permute(0, 3, 1, 2)

    def _decode_continuous(self, z_q: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z_q))  # (B, 3, 64, 64) in [-1, 1], not clamped


def commitment_losses(y: Tensor, z_q: Tensor) -> tuple[Tensor, Tensor]:
    """Appendix A.1, terms 2 and 3, with y = E(x) and z_q = e(z).

    ||sg(E(x)) - e(z)||_2^2 moves only the codebook; ||sg(e(z)) - E(x)||_2^2 moves only the encoder.
    Differs from the paper (as the reference code): the squared norms are averaged over elements, not summed.
    Both have weight 1 (the reference's beta = 1).
    """
    codebook = (y.detach() - z_q).pow(2).mean()
    commitment = (z_q.detach() - y).pow(2).mean()
    return codebook, commitment


def codebook_metrics(tokens: Tensor, vocab_size: int) -> dict[str, Tensor]:
    """Codebook use in the batch: perplexity exp(H(p)) of the token frequencies p, and fraction of codes used."""
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).float()  # (N,)
    entropy = torch.special.entr(counts / counts.sum()).sum()  # H(p) = -sum p log p, with 0 log 0 = 0
    return {"codebook_perplexity": entropy.exp().detach(), "codebook_usage": (counts > 0).float().mean().detach()}


def token_usage(tokens: Tensor) -> dict[str, int]:
    """tokens (B, K) -> codes in use and distinct token maps among the B frames. A tokenizer that has not learned the
    objects yet gives most frames the same few codes (README, Does it learn?)."""
    return {"codes_used": len(tokens.unique()), "distinct_frames": len(tokens.unique(dim=0))}


def postprocess(x: Tensor) -> Tensor:
    return (x + 1) / 2  # [-1, 1] -> [0, 1]
