"""The authors' published agents (eloialonso/iris, README "Pretrained models"), converted to this project's modules.

The authors trained IRIS once per game of Atari 100k and published one file per game, `<Game>.pt`, at
AUTHORS_CHECKPOINT_URL (Alien, Amidar, ..., UpNDown: the 26 games of Table 1, spelled as env.ATARI_100K_GAMES).
A file is their Agent's state_dict, as their src/trainer.py saves it (`agent.state_dict()` to last.pt; their README
has a published file copied to checkpoints/last.pt to watch it play), at the paper config (their config/*.yaml,
our paper preset): tensors named `tokenizer.*`, `world_model.*` and `actor_critic.*`.
Their modules hold the same numbers as ours under other names, plus a few tensors ours do not keep:

- tokenizer: taming-transformers names (`encoder.down.{level}.block.{i}.norm1`, ...) where ours are nn.Sequential
  indices; the three 1x1 convs q, k, v of each attention block, which ours fuse into one conv `qkv`; and the
  frozen LPIPS net of L_perceptual, `tokenizer.lpips.*` (VGG16 trunk, lin0..lin4, ScalingLayer), which ours
  never saves (tokenizer.py builds it).
- world_model: minGPT names; separate `key`, `query`, `value` Linear layers, fused into `qkv` here; each
  attention's causal mask saved as a buffer `attn.mask` (L(K+1), L(K+1)); the index buffers `indices` of the
  three heads, which pick the positions each head reads; the action and frame embeddings as
  `embedder.embedding_tables.0` and `.1`.
- actor_critic: `conv1`..`conv4`, `lstm`, `actor_linear`, `critic_linear`.

convert_authors_state_dict reads the number of actions A from the file (the actor head and the world model's
action embedding), checks every name and shape against that layout, and returns our three state_dicts.
authors_state_dict goes the other way (for tests: the authors' layout written from our numbers).
"""

import os
from collections.abc import Mapping
from typing import NoReturn

import torch
import torch.nn as nn
import torchvision

from actor_critic import ActorCritic, ActorCriticConfig
from tokenizer import (LPIPS_CHANNELS, LPIPS_SCALE, LPIPS_SHIFT, VGG16_STAGE_ENDS, Downsample, ResidualBlock,
                       SelfAttention, Tokenizer, TokenizerConfig, Upsample)
from world_model import WorldModel, WorldModelConfig

# The first author's Hugging Face repository, linked from the README of eloialonso/iris since August 2024. Before
# that it linked the git-lfs repository github.com/eloialonso/iris_pretrained_models, whose pointers list the 26
# files pretrained_models/<Game>.pt, about 126.5 MB each (Pong.pt: 126,508,385 bytes).
AUTHORS_CHECKPOINT_URL = "https://huggingface.co/eloialonso/iris/resolve/main/pretrained_models/{game}.pt"
COMPONENTS = ("tokenizer", "world_model", "actor_critic")
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
            "world_model": WorldModel(WorldModelConfig(), tokenizer_config.vocab_size,
                                      tokenizer_config.tokens_per_frame, num_actions),
            "actor_critic": ActorCritic(ActorCriticConfig(), num_actions),
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
    pairs: Pairs = [("action_embedding", ("embedder.embedding_tables.0",)),
                    ("frame_embedding", ("embedder.embedding_tables.1",)),
                    ("position_embedding", ("pos_emb",)), ("ln_f", ("transformer.ln_f",))]
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
    values = {f"tokenizer.lpips.scaling_layer.{name}": torch.tensor(numbers).view(1, 3, 1, 1)
              for name, numbers in (("shift", LPIPS_SHIFT), ("scale", LPIPS_SCALE))}
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
        refuse("this is a checkpoint of this project (keys 'agent', 'config', 'num_actions'); load it with "
               "Agent.load(path) instead")
    if "world_model.frame_embedding.weight" in state_dict or "tokenizer.encoder.0.weight" in state_dict:
        refuse("this is the state_dict of this project's Agent (our names, e.g. world_model.frame_embedding); "
               "load it with load_state_dict instead")
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        refuse(f"{len(not_tensors)} entries are not tensors, e.g. {not_tensors[:3]}")


def check_names_and_shapes(state_dict: Mapping, expected: dict[str, torch.Size], num_actions: int) -> None:
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        refuse(f"{len(missing)} missing tensors {missing[:5]} and {len(unexpected)} unexpected ones "
               f"{unexpected[:5]} (with A = {num_actions} actions read from {ACTOR_HEAD})")
    wrong = [f"{key} {tuple(state_dict[key].shape)} instead of {tuple(shape)}"
             for key, shape in expected.items() if state_dict[key].shape != shape]
    if wrong:
        refuse(f"{len(wrong)} tensors have other shapes (with A = {num_actions} actions read from {ACTOR_HEAD}): "
               f"{'; '.join(wrong[:5])}")


def check_extra_values(state_dict: Mapping, num_actions: int) -> None:
    for key, value in extra_values(num_actions).items():
        if "lpips" not in key and not torch.equal(state_dict[key].to(value.dtype), value):
            refuse(f"{key} is not the paper config's (causal attention over L(K+1) = 340 tokens, K = 16)")
