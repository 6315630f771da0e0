"""Chinese-CLIP (OFA-Sys `cn_clip`) training checkpoints to and from BertCLIP models.

A cn_clip checkpoint is what its trainer saves: {"epoch", "step", "name", "state_dict", "optimizer"},
the state dict keyed `module.visual.*` (an OpenAI-CLIP ViT), `module.bert.*` (a BERT without
pooler), `module.text_projection` [hidden, embed] and `module.logit_scale`. Its text feature is the
[CLS] hidden state times `text_projection` (`CLIP.encode_text`), so the BertCLIP model uses
text_pooling "cls". The architecture is read from the tensor shapes; only the number of attention
heads is not in them, and comes from the head widths of cn_clip's own model configs.
"""

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import BertConfig, CLIPVisionConfig

from component.configuration import BertCLIPConfig
from component.interop import CheckpointError

# Head widths in cn_clip's model configs: 64 everywhere except ViT-H-14 (width 1280, 16 heads of 80).
TEXT_HEAD_WIDTH = 64
VISION_HEAD_WIDTHS = {1280: 80}
DEFAULT_VISION_HEAD_WIDTH = 64
# Settings cn_clip's CLIP class fixes in code; a BertCLIP model must match them to be exported.
VISION_FIXED = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3}
TEXT_FIXED = {"hidden_act": "gelu", "layer_norm_eps": 1e-12}


@dataclass(frozen=True)
class CnClipArchitecture:
    """The arguments of cn_clip's `CLIP(...)` constructor (the merged vision and text model configs)."""

    embed_dim: int
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    vision_head_width: int
    vocab_size: int
    text_hidden_size: int
    text_intermediate_size: int
    text_max_position_embeddings: int
    text_num_attention_heads: int
    text_num_hidden_layers: int
    text_type_vocab_size: int
    text_hidden_act: str = "gelu"
    text_hidden_dropout_prob: float = 0.1
    text_attention_probs_dropout_prob: float = 0.1
    text_initializer_range: float = 0.02

    def vision_config_json(self) -> dict:
        """The vision half, as a cn_clip `model_configs/ViT-*.json` holds it."""
        return {
            "embed_dim": self.embed_dim,
            "image_resolution": self.image_resolution,
            "vision_layers": self.vision_layers,
            "vision_width": self.vision_width,
            "vision_head_width": self.vision_head_width,
            "vision_patch_size": self.vision_patch_size,
        }

    def text_config_json(self) -> dict:
        """The text half, as a cn_clip `model_configs/<BERT>.json` holds it."""
        return {k: v for k, v in asdict(self).items() if k == "vocab_size" or k.startswith("text_")}

    def bert_clip_config(self, logit_scale: float) -> BertCLIPConfig:
        """The BertCLIP config of the same architecture (text_pooling "cls", as cn_clip pools)."""
        text = BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.text_hidden_size,
            num_hidden_layers=self.text_num_hidden_layers,
            num_attention_heads=self.text_num_attention_heads,
            intermediate_size=self.text_intermediate_size,
            max_position_embeddings=self.text_max_position_embeddings,
            type_vocab_size=self.text_type_vocab_size,
            hidden_dropout_prob=self.text_hidden_dropout_prob,
            attention_probs_dropout_prob=self.text_attention_probs_dropout_prob,
            initializer_range=self.text_initializer_range,
            pad_token_id=0,  # cn_clip masks the [PAD] id, 0 in its vocabulary
            **TEXT_FIXED,
        )
        vision = CLIPVisionConfig(
            hidden_size=self.vision_width,
            intermediate_size=4 * self.vision_width,  # cn_clip's MLP is always 4x wide
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_width // self.vision_head_width,
            image_size=self.image_resolution,
            patch_size=self.vision_patch_size,
            **VISION_FIXED,
        )
        return BertCLIPConfig(
            text_config=text.to_dict(),
            vision_config=vision.to_dict(),
            projection_dim=self.embed_dim,
            logit_scale_init_value=logit_scale,
            text_pooling="cls",
        )


def installed_cn_clip_dir() -> Path | None:
    """The `cn_clip/clip` directory of an installed cn_clip, found without importing it.

    Importing cn_clip would import torchvision (cn_clip/clip/utils.py), which is not needed here.
    """
    spec = importlib.util.find_spec("cn_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "clip"


def default_vocab_file() -> Path:
    """The vocab.txt that the installed cn_clip ships; `CheckpointError` when there is none."""
    directory = installed_cn_clip_dir()
    if directory is None or not (directory / "vocab.txt").is_file():
        raise CheckpointError(
            "no vocabulary: pass --vocab_file (the vocab.txt of the checkpoint's text tower), "
            "or install cn_clip (pip install --no-deps cn_clip) to use the vocab.txt it ships"
        )
    return directory / "vocab.txt"


def read_cn_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a cn_clip checkpoint, without `module.` and with FlashAttention keys undone.

    Accepts the trainer's dict (weights under "state_dict") or a bare state dict. Loaded with
    `weights_only=True`: cn_clip checkpoints hold only tensors and plain Python values.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle of arbitrary objects, a zip of something else, a text file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a Chinese-CLIP checkpoint (torch.load: {reason})") from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a Chinese-CLIP checkpoint (no state_dict of tensors)")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if any(key.startswith(("visual.layer1.", "visual.attnpool.")) for key in state):
        raise CheckpointError(
            f"{path}: a ResNet image tower (Chinese-CLIP RN50), which the toolkit cannot convert: "
            "its image tower is a ViT; use a ViT-B-16, ViT-L-14, ViT-L-14-336 or ViT-H-14 checkpoint"
        )
    required = ("visual.conv1.weight", "visual.proj", "bert.embeddings.word_embeddings.weight",
                "text_projection", "logit_scale")  # fmt: skip
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a Chinese-CLIP checkpoint (no {', '.join(missing)} weights)")
    return undo_flash_attention_keys(state)


def undo_flash_attention_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of a FlashAttention-trained model (`use_flash_attention`) to the plain ones.

    cn_clip's FlashMHA packs q, k and v into one `Wqkv` Linear, in that order, as
    `nn.MultiheadAttention.in_proj_weight` does; its BERT moves the attention output Linear into
    `attention.self.out_proj` (cn_clip.clip.model.convert_state_dict does the same both ways).
    """
    plain = {}
    for key, value in state.items():
        if key.startswith("visual.") and ".attn.Wqkv." in key:
            plain[key.replace(".attn.Wqkv.weight", ".attn.in_proj_weight").replace(
                ".attn.Wqkv.bias", ".attn.in_proj_bias")] = value  # fmt: skip
        elif key.startswith("bert.") and ".attention.self.Wqkv." in key:
            stem, kind = key.rsplit(".attention.self.Wqkv.", 1)
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                plain[f"{stem}.attention.self.{name}.{kind}"] = part
        elif key.startswith("bert.") and ".attention.self.out_proj." in key:
            plain[key.replace(".attention.self.out_proj.", ".attention.output.dense.")] = value
        else:
            plain[key] = value
    return plain


def _count_layers(state: dict, prefix: str) -> int:
    layers = {int(key[len(prefix) :].split(".", 1)[0]) for key in state if key.startswith(prefix)}
    return max(layers) + 1 if layers else 0


def infer_architecture(
    state: dict[str, torch.Tensor],
    vision_head_width: int | None = None,
    text_head_width: int = TEXT_HEAD_WIDTH,
) -> CnClipArchitecture:
    """The cn_clip architecture of a (plain-keyed) state dict, from its tensor shapes.

    The head widths default to those of cn_clip's model configs (`VISION_HEAD_WIDTHS`, 64).
    """
    vision_width, _, patch, _ = state["visual.conv1.weight"].shape
    vision_head_width = vision_head_width or VISION_HEAD_WIDTHS.get(vision_width, DEFAULT_VISION_HEAD_WIDTH)
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vocab_size, text_hidden = state["bert.embeddings.word_embeddings.weight"].shape
    for tower, width, head in (
        ("vision", vision_width, vision_head_width),
        ("text", text_hidden, text_head_width),
    ):
        if width % head:
            raise CheckpointError(
                f"the {tower} tower's width {width} is not a multiple of the head width {head}; "
                f"give the head width it was trained with (--{tower}_head_width)"
            )
    return CnClipArchitecture(
        embed_dim=state["visual.proj"].shape[1],
        image_resolution=grid * patch,
        vision_layers=_count_layers(state, "visual.transformer.resblocks."),
        vision_width=vision_width,
        vision_patch_size=patch,
        vision_head_width=vision_head_width,
        vocab_size=vocab_size,
        text_hidden_size=text_hidden,
        text_intermediate_size=state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
        text_max_position_embeddings=state["bert.embeddings.position_embeddings.weight"].shape[0],
        text_num_attention_heads=text_hidden // text_head_width,
        text_num_hidden_layers=_count_layers(state, "bert.encoder.layer."),
        text_type_vocab_size=state["bert.embeddings.token_type_embeddings.weight"].shape[0],
    )


# cn_clip visual.* names -> transformers CLIPVisionModel names (vision_model.*), by prefix.
_VISION_NAMES = (
    ("class_embedding", "embeddings.class_embedding"),
    ("conv1.weight", "embeddings.patch_embedding.weight"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_pre.", "pre_layrnorm."),
    ("ln_post.", "post_layernorm."),
)
# Within one transformer block: cn_clip resblocks.N.* -> transformers layers.N.*.
_BLOCK_NAMES = (
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
)
_CN_BLOCKS, _HF_BLOCKS = "transformer.resblocks.", "encoder.layers."


def _rename(name: str, pairs, source: str) -> str:
    for old, new in pairs:
        if name.startswith(old):
            return new + name[len(old) :]
    raise CheckpointError(f"{source}: unexpected weight {name!r} for a Chinese-CLIP ViT-BERT model")


def _vision_to_hf(name: str, value: torch.Tensor, source: str) -> dict[str, torch.Tensor]:
    if not name.startswith(_CN_BLOCKS):
        return {f"vision_model.{_rename(name, _VISION_NAMES, source)}": value}
    layer, rest = name[len(_CN_BLOCKS) :].split(".", 1)
    prefix = f"vision_model.{_HF_BLOCKS}{layer}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = "weight" if rest.endswith("weight") else "bias"
        # in_proj stacks q, k and v along the output dimension: [3 * width, ...]
        return {
            f"{prefix}self_attn.{n}_proj.{kind}": part for n, part in zip("qkv", value.chunk(3), strict=True)
        }
    return {prefix + _rename(rest, _BLOCK_NAMES, source): value}


def cn_clip_to_bert_clip_state(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict:
    """A BertCLIPModel state dict from a plain-keyed cn_clip one (see `read_cn_clip_state_dict`)."""
    converted = {}
    for name, value in state.items():
        value = value.float()  # released checkpoints are partly fp16
        if name.startswith("bert.pooler."):
            continue  # cn_clip's BERT has no pooler; its loaders drop these too
        if name.startswith("bert."):
            converted[f"text_model.{name.removeprefix('bert.')}"] = value
        elif name in ("text_projection", "visual.proj"):
            # cn_clip multiplies x @ proj with proj [width, embed]; nn.Linear stores [embed, width].
            target = "text_projection.weight" if name == "text_projection" else "visual_projection.weight"
            converted[target] = value.T.contiguous()
        elif name == "logit_scale":
            converted["logit_scale"] = value.reshape(())
        elif name.startswith("visual."):
            converted.update(_vision_to_hf(name.removeprefix("visual."), value, source))
        else:
            raise CheckpointError(f"{source}: unexpected weight {name!r} for a Chinese-CLIP model")
    return converted


def _vision_to_cn(name: str, state: dict, source: str) -> dict[str, torch.Tensor]:
    if not name.startswith(_HF_BLOCKS):
        return {
            f"visual.{_rename(name, [(b, a) for a, b in _VISION_NAMES], source)}": state[
                f"vision_model.{name}"
            ]
        }
    layer, rest = name[len(_HF_BLOCKS) :].split(".", 1)
    prefix = f"visual.{_CN_BLOCKS}{layer}."
    if rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
        return {}  # written with q_proj, as one in_proj
    if rest.startswith("self_attn.q_proj."):
        kind = rest.rsplit(".", 1)[1]
        parts = [state[f"vision_model.{_HF_BLOCKS}{layer}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
        return {f"{prefix}attn.in_proj_{kind}": torch.cat(parts)}
    return {prefix + _rename(rest, [(b, a) for a, b in _BLOCK_NAMES], source): state[f"vision_model.{name}"]}


def bert_clip_to_cn_clip_state(state: dict[str, torch.Tensor], source: str = "model") -> dict:
    """A cn_clip `CLIP` state dict (plain keys) from a BertCLIPModel one with text_pooling "cls"."""
    converted = {}
    for name, value in state.items():
        if name.startswith("text_model.pooler."):
            continue
        if name.startswith("text_model."):
            converted[f"bert.{name.removeprefix('text_model.')}"] = value
        elif name in ("text_projection.weight", "visual_projection.weight"):
            target = "text_projection" if name.startswith("text") else "visual.proj"
            converted[target] = value.T.contiguous()
        elif name == "logit_scale":
            converted["logit_scale"] = value
        elif name.startswith("vision_model."):
            converted.update(_vision_to_cn(name.removeprefix("vision_model."), state, source))
        else:
            raise CheckpointError(f"{source}: weight {name!r} has no place in a Chinese-CLIP model")
    return converted
