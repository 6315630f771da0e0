"""Model configuration for BertCLIP: a CLIP ViT image tower and a BERT text tower."""

from typing import ClassVar, Literal

from transformers import BertConfig, CLIPVisionConfig, PreTrainedConfig

TextPooling = Literal["cls", "pooler"]
TEXT_POOLINGS = ("cls", "pooler")


class BertCLIPConfig(PreTrainedConfig):
    """Architecture of a BertCLIP model; training choices live in `component.training.arguments`.

    Args:
        text_config: a `BertConfig` or its dict.
        vision_config: a `CLIPVisionConfig` or its dict.
        projection_dim: size of the shared image-text embedding space.
        logit_scale_init_value: initial log of the softmax temperature's inverse (ln(1/0.07)).
        text_pooling: "cls" uses the last hidden state of [CLS] (Chinese-CLIP, transformers'
            ChineseCLIPModel); "pooler" uses BERT's pooler output (the original CLIP-Chinese).
    """

    model_type = "bert_clip"
    sub_configs_defaults: ClassVar[dict] = {
        "text_config": BertConfig,
        "vision_config": CLIPVisionConfig,
    }

    text_config: dict | BertConfig | None = None
    vision_config: dict | CLIPVisionConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    text_pooling: str = "cls"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"text_pooling must be one of {TEXT_POOLINGS}, got {self.text_pooling!r}")
        if self.projection_dim < 1:
            raise ValueError(f"projection_dim must be positive, got {self.projection_dim}")
