"""Random towers of given sizes, saved like hub checkpoints, and their training FLOPs."""

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, CLIPConfig, CLIPImageProcessorPil, CLIPModel

from component.testing.tiny import write_chinese_tokenizer

# Dense bf16 tensor-core peaks in FLOP/s; the first name found in the device name is used.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass(frozen=True)
class Towers:
    """Sizes of a CLIP ViT image tower and a BERT text tower; both MLPs are 4x hidden wide."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    projection_dim: int


QUICK_TOWERS = Towers(32, 8, 32, 2, 4, 32, 2, 4, 16)
SMALL_TOWERS = Towers(224, 32, 128, 2, 4, 64, 2, 4, 64)  # cheap model: the input pipeline decides
IMAGE_HEAVY_TOWERS = Towers(224, 32, 256, 6, 8, 64, 2, 4, 64)  # the image tower dominates the cost
VIT_B16_BERT_BASE = Towers(224, 16, 768, 12, 12, 768, 12, 12, 512)


def write_towers(directory: Path, towers: Towers, seed: int = 0) -> tuple[Path, Path]:
    """A random CLIPModel with OpenAI CLIP's image processor settings, and a random BertModel with
    the Chinese tokenizer, in `directory`/clip and `directory`/bert; the same for the same seed."""
    clip_dir, bert_dir = directory / "clip", directory / "bert"
    torch.manual_seed(seed)
    tokenizer = write_chinese_tokenizer(bert_dir)
    text = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=towers.text_hidden,
        num_hidden_layers=towers.text_layers,
        num_attention_heads=towers.text_heads,
        intermediate_size=4 * towers.text_hidden,
    )
    BertModel(text).save_pretrained(str(bert_dir))
    vision = dict(
        image_size=towers.image_size,
        patch_size=towers.patch_size,
        hidden_size=towers.vision_hidden,
        num_hidden_layers=towers.vision_layers,
        num_attention_heads=towers.vision_heads,
        intermediate_size=4 * towers.vision_hidden,
    )
    # BertCLIP does not use the CLIP text tower; it only has to exist in the checkpoint.
    unused_text = dict(vocab_size=99, bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32,
                       num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)  # fmt: skip
    config = CLIPConfig(text_config=unused_text, vision_config=vision, projection_dim=towers.projection_dim)
    CLIPModel(config).save_pretrained(str(clip_dir))
    side = towers.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor.save_pretrained(str(clip_dir))
    return clip_dir, bert_dir


def encoder_flops(tokens: int, hidden: int, layers: int) -> float:
    """Forward FLOPs of a transformer encoder's matmuls with a 4x MLP: 24·n·d² + 4·n²·d per layer."""
    return layers * (24 * tokens * hidden**2 + 4 * tokens**2 * hidden)


def training_flops_per_sample(towers: Towers, seq_length: int, mode: str) -> float:
    """Model FLOPs of one training sample in mode 'lit_cached', 'lit' or 'full'.

    A trained tower costs forward + backward (3x forward), a locked one its forward, and cached
    image features nothing.
    """
    patches = (towers.image_size // towers.patch_size) ** 2
    vision = encoder_flops(patches + 1, towers.vision_hidden, towers.vision_layers)
    vision += 2 * patches * 3 * towers.patch_size**2 * towers.vision_hidden  # the patch embedding
    vision += 2 * towers.vision_hidden * towers.projection_dim
    text = encoder_flops(seq_length, towers.text_hidden, towers.text_layers)
    text += 2 * towers.text_hidden * towers.projection_dim
    vision_passes = {"lit_cached": 0, "lit": 1, "full": 3}[mode]
    return vision_passes * vision + 3 * text


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a known accelerator, or None."""
    return next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in device_name), None)
