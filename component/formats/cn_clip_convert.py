"""Conversions between the toolkit's model directories and Chinese-CLIP's two formats.

`from_cn_clip` / `to_cn_clip`: OFA-Sys cn_clip training checkpoints (`epoch_latest.pt`).
`from_chinese_clip` / `to_chinese_clip_dir`: transformers ChineseCLIP directories.
"""

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers
from transformers import (
    BertTokenizerFast,
    CLIPImageProcessorPil,
    PreTrainedTokenizerFast,
    VisionTextDualEncoderProcessor,
)
from transformers.utils import logging

from component.formats.cn_clip import (
    TEXT_FIXED,
    VISION_FIXED,
    CnClipArchitecture,
    bert_clip_to_cn_clip_state,
    cn_clip_to_bert_clip_state,
    default_vocab_file,
    infer_architecture,
    read_cn_clip_state_dict,
)
from component.interop import IMAGE_SETTINGS, CheckpointError, save_chinese_clip
from component.model import BertCLIPModel
from component.processor import ImageTransform, check_tokenizer_fits, load_processor
from datatools.atomic import atomic_file, write_json_atomic

logger = logging.get_logger(__name__)

# cn_clip.clip.utils.image_transform: a bicubic resize to a square, no crop, OpenAI CLIP's mean/std.
CN_CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CN_CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3

# The model configs cn_clip ships (cn_clip/clip/model_configs), so that an export of one of these
# sizes loads by name; tests check this table against the installed package.
SHIPPED_VISION_CONFIGS = {
    name: dict(zip(("embed_dim", "image_resolution", "vision_layers", "vision_width",
                    "vision_head_width", "vision_patch_size"), values, strict=True))
    for name, values in {
        "ViT-B-16": (512, 224, 12, 768, 64, 16),
        "ViT-B-32": (512, 224, 12, 768, 64, 32),
        "ViT-L-14": (768, 224, 24, 1024, 64, 14),
        "ViT-L-14-336": (768, 336, 24, 1024, 64, 14),
        "ViT-H-14": (1024, 224, 32, 1280, 80, 14),
    }.items()
}  # fmt: skip
SHIPPED_TEXT_CONFIGS = {
    name: dict(zip(("vocab_size", "text_hidden_size", "text_intermediate_size",
                    "text_max_position_embeddings", "text_num_attention_heads",
                    "text_num_hidden_layers", "text_type_vocab_size"), values, strict=True))
    for name, values in {
        "RoBERTa-wwm-ext-base-chinese": (21128, 768, 3072, 512, 12, 12, 2),
        "RoBERTa-wwm-ext-large-chinese": (21128, 1024, 4096, 512, 16, 24, 2),
        "RBT3-chinese": (21128, 768, 3072, 512, 12, 3, 2),
    }.items()
}  # fmt: skip


def cn_clip_processor(vocab_file: str | Path, image_resolution: int, max_length: int):
    """A processor that tokenises and preprocesses images as cn_clip does.

    The tokenizer is BERT's over cn_clip's vocabulary (lower-casing, one token per Chinese
    character, as cn_clip's FullTokenizer) with cn_clip's quote clean-up (`with_cn_clip_quotes`);
    images are resized to a square, not cropped.
    """
    with tempfile.TemporaryDirectory() as directory:
        # BertTokenizerFast(vocab_file=...) ignores the file in transformers 5; from_pretrained reads it.
        shutil.copyfile(vocab_file, Path(directory) / "vocab.txt")
        tokenizer = with_cn_clip_quotes(BertTokenizerFast.from_pretrained(directory, do_lower_case=True))
    tokenizer.model_max_length = max_length
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"height": image_resolution, "width": image_resolution},
        resample=BICUBIC,
        do_center_crop=False,
        crop_size={"height": image_resolution, "width": image_resolution},
        image_mean=list(CN_CLIP_IMAGE_MEAN),
        image_std=list(CN_CLIP_IMAGE_STD),
    )
    return VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)


def with_cn_clip_quotes(tokenizer: BertTokenizerFast) -> PreTrainedTokenizerFast:
    """`tokenizer` with the rest of cn_clip's text clean-up in front: curly double quotes become
    straight ones, as its data loaders' `_preprocess_text` does before every caption is tokenised.

    The rule lives in the tokenizer's normalizer, so it travels with the saved model. It is saved as
    a generic fast tokenizer: transformers rebuilds a BertTokenizer's normalizer from its settings on
    load, which would drop the rule.
    """
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Sequence(
        [normalizers.Replace("\u201c", '"'), normalizers.Replace("\u201d", '"'), backend.normalizer]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_input_names=tokenizer.model_input_names,
        **tokenizer.special_tokens_map,
    )


def load_cn_clip_model(
    checkpoint: str | Path, vision_head_width: int | None = None, text_head_width: int = 64
) -> BertCLIPModel:
    """A BertCLIPModel with the weights of a cn_clip checkpoint (`module.` prefix and Wqkv keys or not)."""
    state = read_cn_clip_state_dict(checkpoint)
    architecture = infer_architecture(state, vision_head_width, text_head_width)
    model = BertCLIPModel(architecture.bert_clip_config(float(state["logit_scale"])))
    try:
        model.load_state_dict(cn_clip_to_bert_clip_state(state, str(checkpoint)), strict=True)
    except RuntimeError as error:  # weights missing or of another shape than the first ones imply
        reason = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise CheckpointError(f"{checkpoint}: inconsistent Chinese-CLIP weights ({reason})") from error
    return model.eval()


def from_cn_clip(
    checkpoint: str | Path,
    output: str | Path,
    vocab_file: str | Path | None = None,
    vision_head_width: int | None = None,
    text_head_width: int = 64,
) -> BertCLIPModel:
    """Write a toolkit model directory (weights plus processor) for a cn_clip training checkpoint.

    `vocab_file` defaults to the vocab.txt of the installed cn_clip.
    """
    vocab_file = Path(vocab_file) if vocab_file is not None else default_vocab_file()
    if not vocab_file.is_file():
        raise CheckpointError(f"{vocab_file}: no such vocabulary file")
    model = load_cn_clip_model(checkpoint, vision_head_width, text_head_width)
    text_config = model.config.text_config
    processor = cn_clip_processor(
        vocab_file, model.config.vision_config.image_size, text_config.max_position_embeddings
    )
    check_tokenizer_fits(processor.tokenizer, model, vocab_file)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    return model


def architecture_of(model: BertCLIPModel, source: str | Path) -> CnClipArchitecture:
    """The cn_clip architecture of a BertCLIP model; `CheckpointError` where cn_clip has no equivalent."""
    config = model.config
    vision, text = config.vision_config, config.text_config
    differences = [f"text_pooling {config.text_pooling!r} (cn_clip pools [CLS]: 'cls')"] * (
        config.text_pooling != "cls"
    )
    if model.logit_bias is not None:
        differences.append("a logit bias (a SigLIP model; Chinese-CLIP has none)")
    if text.model_type != "bert":  # XLM-R keys look like BERT's, but its positions are offset
        differences.append(f"text tower {text.model_type!r} (cn_clip: BERT)")
    if vision.intermediate_size != 4 * vision.hidden_size:
        differences.append(f"image MLP width {vision.intermediate_size} (cn_clip: 4 x {vision.hidden_size})")
    for tower, fixed in ((vision, VISION_FIXED), (text, TEXT_FIXED)):
        differences += [
            f"{k} {getattr(tower, k)!r} (cn_clip: {v!r})" for k, v in fixed.items() if getattr(tower, k) != v
        ]
    if differences:
        raise CheckpointError(f"{source}: cannot be a Chinese-CLIP model: {'; '.join(differences)}")
    return CnClipArchitecture(
        embed_dim=config.projection_dim,
        image_resolution=vision.image_size,
        vision_layers=vision.num_hidden_layers,
        vision_width=vision.hidden_size,
        vision_patch_size=vision.patch_size,
        vision_head_width=vision.hidden_size // vision.num_attention_heads,
        vocab_size=text.vocab_size,
        text_hidden_size=text.hidden_size,
        text_intermediate_size=text.intermediate_size,
        text_max_position_embeddings=text.max_position_embeddings,
        text_num_attention_heads=text.num_attention_heads,
        text_num_hidden_layers=text.num_hidden_layers,
        text_type_vocab_size=text.type_vocab_size,
        text_hidden_dropout_prob=text.hidden_dropout_prob,
        text_attention_probs_dropout_prob=text.attention_probs_dropout_prob,
        text_initializer_range=text.initializer_range,
    )


@dataclass(frozen=True)
class CnClipExport:
    """Where `to_cn_clip` wrote a checkpoint, and the names cn_clip needs to load it."""

    checkpoint: Path
    vision_model_name: str
    text_model_name: str
    input_resolution: int
    config_files: tuple[Path, ...]  # model configs cn_clip does not ship; empty when it does

    def usage(self) -> str:
        """How to load the checkpoint with cn_clip, as printed by convert_checkpoint.py."""
        load = (f"cn_clip.clip.load_from_name({str(self.checkpoint)!r}, vision_model_name="
                f"{self.vision_model_name!r}, text_model_name={self.text_model_name!r}, "
                f"input_resolution={self.input_resolution})")  # fmt: skip
        if not self.config_files:
            return f"load it with {load}"
        files = " and ".join(str(path) for path in self.config_files)
        return (f"cn_clip ships no model config of this size: copy {files} into cn_clip/clip/model_configs/ "
                f"of your cn_clip, then load it with {load} (or train with --vision-model "
                f"{self.vision_model_name} --text-model {self.text_model_name})")  # fmt: skip


def shipped_config_name(config: dict, shipped: dict[str, dict]) -> str | None:
    """The name of the cn_clip model config `config` (a half of `CnClipArchitecture`) matches, if any."""
    return next(
        (name for name, known in shipped.items() if all(config[k] == v for k, v in known.items())), None
    )


def to_cn_clip(model_dir: str | Path, output: str | Path) -> CnClipExport:
    """Write a toolkit (or ChineseCLIP) model as a cn_clip checkpoint that `load_from_name` loads.

    The file is the trainer's dict with epoch and step 0 and no optimizer state (resume training
    from it with --reset-data-offset --reset-optimizer). Sizes cn_clip has no model config for get
    `<stem>-ViT.json` and `<stem>-BERT.json` beside the checkpoint.
    """
    model = BertCLIPModel.from_pretrained(model_dir)
    architecture = architecture_of(model, model_dir)
    _warn_if_preprocessing_differs(model_dir, architecture.image_resolution)
    state = bert_clip_to_cn_clip_state(model.float().state_dict(), str(model_dir))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    vision_config, text_config = architecture.vision_config_json(), architecture.text_config_json()
    vision_name = shipped_config_name(vision_config, SHIPPED_VISION_CONFIGS) or f"{output.stem}-ViT"
    text_name = shipped_config_name(text_config, SHIPPED_TEXT_CONFIGS) or f"{output.stem}-BERT"
    config_files = []
    for name, config, shipped in ((vision_name, vision_config, SHIPPED_VISION_CONFIGS),
                                  (text_name, text_config, SHIPPED_TEXT_CONFIGS)):  # fmt: skip
        if name not in shipped:
            config_files.append(output.parent / f"{name}.json")
            write_json_atomic(config_files[-1], config)
    checkpoint = {
        "epoch": 0,
        "step": 0,
        "name": f"converted from {model_dir}",
        # The trainer saves its DistributedDataParallel-wrapped model, hence "module.".
        "state_dict": {f"module.{key}": value.contiguous() for key, value in state.items()},
    }
    with atomic_file(output) as handle:
        torch.save(checkpoint, handle)
    return CnClipExport(output, vision_name, text_name, architecture.image_resolution, tuple(config_files))


def _warn_if_preprocessing_differs(model_dir: str | Path, resolution: int) -> None:
    # cn_clip always resizes to a square without a crop; a model trained on centre crops still
    # loads, but its numbers under cn_clip's transform will differ a little.
    try:
        transform = ImageTransform.from_processor(load_processor(model_dir))
    except CheckpointError:
        return
    if transform.crop or transform.resize_to != (resolution, resolution):
        logger.warning(
            f"{model_dir}: its processor resizes and crops differently from cn_clip (a {resolution}px "
            "square resize, no crop); results under cn_clip's image_transform will differ slightly"
        )


def from_chinese_clip(chinese_dir: str | Path, output: str | Path) -> BertCLIPModel:
    """Write a transformers ChineseCLIP directory as a toolkit model directory.

    The weights and the preprocessing stay the same; the processor becomes the toolkit's own
    (a `VisionTextDualEncoderProcessor` with a CLIP image processor).
    """
    model = BertCLIPModel.from_pretrained(chinese_dir)
    chinese_processor = load_processor(chinese_dir)
    image_processor = chinese_processor.image_processor
    settings = {k: v for k, v in image_processor.to_dict().items() if k in IMAGE_SETTINGS}
    processor = VisionTextDualEncoderProcessor(
        image_processor=CLIPImageProcessorPil(**settings), tokenizer=chinese_processor.tokenizer
    )
    model.save_pretrained(output)
    processor.save_pretrained(output)
    return model


def to_chinese_clip_dir(model_dir: str | Path, output: str | Path) -> None:
    """Write a toolkit model directory as a transformers ChineseCLIP directory with its processor."""
    model = BertCLIPModel.from_pretrained(model_dir)
    try:
        save_chinese_clip(model, output, load_processor(model_dir))
    except ValueError as error:  # a model ChineseCLIPModel cannot express (BERT pooler pooling)
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{model_dir}: {error}") from error
