"""Model configuration for BertCLIP: a CLIP ViT image tower and a text tower (BERT or any text encoder)."""

from typing import ClassVar

from transformers import AutoConfig, CLIPVisionConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

TEXT_POOLINGS = ("cls", "pooler", "mean")


class BertCLIPConfig(PreTrainedConfig):
    """Architecture of a BertCLIP model; training choices live in `component.training.arguments`.

    Args:
        text_config: the text tower's config (`BertConfig`, `XLMRobertaConfig`, `ErnieConfig`, ...) or
            its dict; a dict without "model_type" is a BERT config, as in every older checkpoint.
        vision_config: a `CLIPVisionConfig` or its dict.
        projection_dim: size of the shared image-text embedding space.
        logit_scale_init_value: initial log of the softmax temperature's inverse (ln(1/0.07)).
        logit_bias_init_value: the initial logit bias, or None for a model without one. A model
            with a bias (SigLIP) scores each image-text pair with a sigmoid rather than a softmax
            over the candidates.
        text_pooling: "cls" uses the last hidden state of the first token (Chinese-CLIP,
            transformers' ChineseCLIPModel); "pooler" uses the tower's pooler output (the original
            CLIP-Chinese); "mean" averages the last hidden states over the attention mask.
    """

    model_type = "bert_clip"
    sub_configs_defaults: ClassVar[dict] = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "vision_config": CLIPVisionConfig,
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | CLIPVisionConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    logit_bias_init_value: float | None = None
    text_pooling: str = "cls"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"text_pooling must be one of {TEXT_POOLINGS}, got {self.text_pooling!r}")
        if self.projection_dim < 1:
            raise ValueError(f"projection_dim must be positive, got {self.projection_dim}")
