"""Checkpoint formats: BertCLIP, transformers ChineseCLIP, the original CLIP-Chinese, and tower exports."""

import copy
import json
import pickle
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers import (
    ChineseCLIPConfig,
    ChineseCLIPImageProcessorPil,
    ChineseCLIPModel,
    ChineseCLIPProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from transformers.utils import logging

from component.configuration import BertCLIPConfig
from component.errors import CheckpointError
from component.processor import IMAGE_PROCESSOR_FILES, load_image_processor, load_processor, load_tokenizer
from component.text_tower import build_text_tower

logger = logging.get_logger(__name__)

# Keys of a ChineseCLIP or CLIP sub-config that only describe the sub-config's own class.
_CLASS_KEYS = ("model_type", "architectures", "_name_or_path", "transformers_version")
# What a CLIP-style image processor does to an image; ChineseCLIPImageProcessor takes the same.
IMAGE_SETTINGS = ("do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size",
                   "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")  # fmt: skip


def read_config_dict(path: str | Path) -> tuple[dict, str]:
    """The raw config.json of a local directory or hub repo, and where it was read from."""
    local = Path(path)
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{local}: no config.json; is this a saved model directory?")
        try:
            return json.loads(config_file.read_text(encoding="utf-8")), str(config_file)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{config_file}: not valid JSON ({error})") from error
    if local.exists():
        raise CheckpointError(f"{local}: is a file; give the directory that holds config.json")
    if looks_local(str(path)):
        raise CheckpointError(f"{local}: no such directory")
    from transformers import PreTrainedConfig

    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(str(path))
    except OSError as error:
        raise CheckpointError(f"{path}: no local directory or hub model of that name ({error})") from error
    return config_dict, f"{path}/config.json"


def looks_local(path: str) -> bool:
    """True for paths that cannot be hub ids ("org/name"): absolute, relative with ./ or ../, or deeper."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path


def _sub_config(config_dict: dict, key: str, source: str) -> dict:
    sub = config_dict.get(key)
    if not isinstance(sub, dict):
        raise CheckpointError(f"{source}: missing the {key!r} section")
    return {k: v for k, v in sub.items() if k not in _CLASS_KEYS}


def config_from_dict(config_dict: dict, source: str) -> BertCLIPConfig:
    """Build a `BertCLIPConfig` from a BertCLIP, ChineseCLIP or original CLIP-Chinese config.json."""
    model_type = config_dict.get("model_type")
    if model_type == BertCLIPConfig.model_type:
        return BertCLIPConfig.from_dict(config_dict)
    shared = {
        "projection_dim": config_dict.get("projection_dim", 512),
        "logit_scale_init_value": config_dict.get("logit_scale_init_value", 2.6592),
    }
    if model_type == "chinese_clip":
        text_pooling = "cls"
    elif model_type == "clip" and (config_dict.get("text_config") or {}).get("model_type") == "bert":
        text_pooling = "pooler"  # the original CLIP-Chinese release: ViT + BERT with its pooler
    else:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not a BertCLIP ('bert_clip'), ChineseCLIP "
            "('chinese_clip') or CLIP-Chinese ('clip' with a BERT text_config) checkpoint"
        )
    return BertCLIPConfig(
        text_config=_sub_config(config_dict, "text_config", source),
        vision_config=_sub_config(config_dict, "vision_config", source),
        text_pooling=text_pooling,
        **shared,
    )


def load_checkpoint_config(path: str | Path) -> BertCLIPConfig:
    """The `BertCLIPConfig` for any checkpoint directory `BertCLIPModel.from_pretrained` accepts."""
    config_dict, source = read_config_dict(path)
    return config_from_dict(config_dict, source)


def report_loading_info(name: str, path, info: dict) -> None:
    """Warn about weights the checkpoint lacked or held in excess; refuse wrong shapes."""
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        raise CheckpointError(f"{path}: weights of the wrong shape for this config: {sorted(mismatched)}")
    for kind in ("missing_keys", "unexpected_keys"):
        keys = sorted(info.get(kind) or [])
        if keys:
            logger.warning(f"{name} from {path}: {kind.replace('_', ' ')}: {keys}")


# What reading a truncated or damaged weights file raises (safetensors, or torch.load for a .bin).
WEIGHTS_FILE_ERRORS = (SafetensorError, pickle.UnpicklingError, EOFError)


def unreadable_weights_error(path: str | Path, error: Exception) -> CheckpointError:
    """The one-line error for a weights file in `path` that cannot be read, naming the file."""
    directory = Path(path)
    suspects = [directory]
    if directory.is_dir():
        safetensors = sorted(directory.glob("*.safetensors"))
        suspects = (
            [file for file in safetensors if not _safetensors_readable(file)]
            or (sorted(directory.glob("*.bin")) + safetensors)
            or suspects
        )
    # torch.load's own message suggests weights_only=False, which is no fix for a damaged file.
    detail = f": {error}" if isinstance(error, SafetensorError) else ""
    return CheckpointError(
        f"{', '.join(map(str, suspects))}: cannot read the weights ({type(error).__name__}{detail}); "
        "the file is truncated, damaged or not a weights file: save or download it again"
    )


def _safetensors_readable(file: Path) -> bool:
    try:
        with safe_open(str(file), framework="pt"):
            return True
    except (SafetensorError, OSError):
        return False


def to_chinese_clip(model) -> ChineseCLIPModel:
    """Copy a BertCLIPModel into a `transformers.ChineseCLIPModel` with identical outputs.

    To write it to disk use `save_chinese_clip`, which saves the matching processor with it.
    """
    _refuse_siglip(model)
    config = model.config
    if config.text_config.model_type != "bert":
        raise CheckpointError(
            f"cannot export as ChineseCLIP: its text tower is BERT, this model's is "
            f"{config.text_config.model_type!r}; keep it as a BertCLIP checkpoint"
        )
    if config.text_pooling != "cls":
        raise ValueError(
            f"to_chinese_clip needs text_pooling='cls', this model uses {config.text_pooling!r}: "
            "ChineseCLIPModel always takes the [CLS] hidden state and has no BERT pooler"
        )
    chinese_config = ChineseCLIPConfig(
        text_config={k: v for k, v in config.text_config.to_dict().items() if k not in _CLASS_KEYS},
        vision_config={k: v for k, v in config.vision_config.to_dict().items() if k not in _CLASS_KEYS},
        projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init_value,
    )
    chinese = ChineseCLIPModel(chinese_config).to(model.dtype)
    chinese.load_state_dict(model.state_dict(), strict=True)
    return chinese.to(model.device).eval()


def _refuse_siglip(model) -> None:
    if getattr(model, "logit_bias", None) is not None:
        raise CheckpointError(
            "cannot export as ChineseCLIP: this model has a logit bias (trained with the SigLIP loss) "
            "and ChineseCLIP has no logit bias; keep it as a BertCLIP checkpoint"
        )


def save_chinese_clip(model, save_directory: str | Path, processor=None) -> None:
    """Write a complete transformers ChineseCLIP directory: `ChineseCLIPModel` weights plus a
    `ChineseCLIPProcessor` (the tokenizer, and a ChineseCLIPImageProcessor with the same resize,
    crop and normalisation), so that `ChineseCLIPProcessor.from_pretrained` and
    `ChineseCLIPModel.from_pretrained` (and predict_similarity.py) load it as it is.

    `processor` defaults to the one saved beside the model. Everything is checked before the
    first file is written.
    """
    _refuse_siglip(model)
    processor = processor if processor is not None else _processor_beside(model)
    if processor is None:
        raise CheckpointError(
            f"no processor saved beside the model ({model.name_or_path}); pass processor= "
            "(component.processor.load_processor(checkpoint)) to save_chinese_clip"
        )
    chinese_processor = to_chinese_clip_processor(processor)
    chinese = to_chinese_clip(model)
    chinese.save_pretrained(save_directory)
    chinese_processor.save_pretrained(save_directory)


def to_chinese_clip_processor(processor) -> ChineseCLIPProcessor:
    """A `ChineseCLIPProcessor` that tokenises and preprocesses exactly as `processor` does."""
    image_processor = processor.image_processor
    settings = {name: getattr(image_processor, name) for name in IMAGE_SETTINGS}
    settings["size"], settings["crop_size"] = dict(settings["size"]), dict(settings["crop_size"] or {})
    return ChineseCLIPProcessor(
        image_processor=ChineseCLIPImageProcessorPil(**settings),
        tokenizer=_standalone_tokenizer(processor.tokenizer),
    )


def save_text_tower(model, save_directory: str | Path, tokenizer=None) -> None:
    """Write the text tower as a plain directory of its own class (`BertModel`, `XLMRobertaModel`, ...)
    that AutoModel loads, with the tokenizer when one is known.

    With text_pooling "cls" the tower has no pooler: read `last_hidden_state[:, 0]` downstream (or
    the masked mean of `last_hidden_state` with text_pooling "mean").
    The tokenizer is saved without a "processor_class": the directory has no image processor, so
    `AutoProcessor` (and sentence-transformers) must see a plain tokenizer.
    """
    tokenizer = tokenizer if tokenizer is not None else _tokenizer_beside(model)
    tower = build_text_tower(model.config.text_config, model.config.text_pooling)
    tower.load_state_dict(model.text_model.state_dict(), strict=True)
    tower.save_pretrained(save_directory)
    if tokenizer is not None:
        _standalone_tokenizer(tokenizer).save_pretrained(save_directory)


def save_vision_tower(model, save_directory: str | Path, image_processor=None) -> None:
    """Write the image tower plus its projection as a `CLIPVisionModelWithProjection` directory.

    The image processor (default: the one saved beside the model) is loaded before anything is
    written, so a failure leaves no half-written directory.
    """
    if image_processor is None:
        image_processor = _image_processor_beside(model)
    vision_config = CLIPVisionConfig(
        **{k: v for k, v in model.config.vision_config.to_dict().items() if k not in _CLASS_KEYS},
    )
    vision_config.projection_dim = model.config.projection_dim
    tower = CLIPVisionModelWithProjection(vision_config)
    state = {f"vision_model.{k}": v for k, v in model.vision_model.state_dict().items()}
    state["visual_projection.weight"] = model.visual_projection.weight
    tower.load_state_dict(state, strict=True)
    tower.save_pretrained(save_directory)
    if image_processor is not None:
        image_processor.save_pretrained(save_directory)


def _standalone_tokenizer(tokenizer):
    # A copy that names no processor class; a processor that saves it sets its own.
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.init_kwargs.pop("processor_class", None)
    tokenizer._set_processor_class(None)
    return tokenizer


def _source_directory(model) -> Path | None:
    source = Path(str(model.name_or_path))
    return source if source.is_dir() else None


def _tokenizer_beside(model):

    source = _source_directory(model)
    if source and any((source / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        return load_tokenizer(source)
    return None


def _image_processor_beside(model):

    source = _source_directory(model)
    if source and any((source / name).is_file() for name in IMAGE_PROCESSOR_FILES):
        return load_image_processor(source)
    return None


def _processor_beside(model):

    source = _source_directory(model)
    if source and any((source / name).is_file() for name in IMAGE_PROCESSOR_FILES):
        return load_processor(source)
    return None
