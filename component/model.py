"""BertCLIP: a CLIP ViT image tower and a text tower (BERT or any text encoder) projected into one space."""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from component.configuration import BertCLIPConfig
from component.interop import (
    WEIGHTS_FILE_ERRORS,
    CheckpointError,
    read_config_dict,
    report_loading_info,
    unreadable_weights_error,
)
from component.loss import get_loss
from component.text_tower import build_text_tower, load_text_tower, pool_text, takes_token_type_ids

logger = logging.get_logger(__name__)


@dataclass
class BertCLIPOutput(ModelOutput):
    """Outputs of `BertCLIPModel.forward`; embeddings are L2-normalised.

    `logit_scale` is the model's parameter (log space) and `logit_bias` its bias or None, so that
    a loss chosen outside the model (`component.loss.get_loss`) gets everything it needs.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None  # [n_images, n_texts]
    logits_per_text: torch.FloatTensor | None = None  # [n_texts, n_images]
    text_embeds: torch.FloatTensor | None = None  # [n_texts, projection_dim]
    image_embeds: torch.FloatTensor | None = None  # [n_images, projection_dim]
    logit_scale: torch.FloatTensor | None = None  # scalar
    logit_bias: torch.FloatTensor | None = None  # scalar, SigLIP models only


@dataclass
class BertCLIPTextOutput(ModelOutput):
    """Outputs of `BertCLIPTextModel.forward`; `text_embeds` are projected, not normalised.

    `pooler_output` is None for a tower without a pooler (text_pooling "cls" or "mean").
    """

    text_embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None


class BertCLIPPreTrainedModel(PreTrainedModel):
    """Shared loading, saving and initialisation for the BertCLIP models."""

    config: BertCLIPConfig
    config_class = BertCLIPConfig
    base_model_prefix = "bert_clip"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules: ClassVar[list[str]] = [
        "BertLayer",
        "BertEmbeddings",
        "CLIPEncoderLayer",
        "CLIPVisionEmbeddings",
    ]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The towers initialise themselves; only the parts owned here need it.
        if isinstance(module, BertCLIPPreTrainedModel):
            text_hidden = self.config.text_config.hidden_size
            init.normal_(module.text_projection.weight, std=text_hidden**-0.5)
            if hasattr(module, "visual_projection"):
                vision_hidden = self.config.vision_config.hidden_size
                init.normal_(module.visual_projection.weight, std=vision_hidden**-0.5)
                init.constant_(module.logit_scale, self.config.logit_scale_init_value)
                if module.logit_bias is not None:
                    init.constant_(module.logit_bias, self.config.logit_bias_init_value)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a BertCLIP, transformers ChineseCLIP or original CLIP-Chinese checkpoint.

        Missing and unexpected weights are logged as warnings; pass `output_loading_info=True`
        to also get them back as a dict.
        """
        from component.interop import load_checkpoint_config

        want_info = kwargs.pop("output_loading_info", False)
        if kwargs.get("config") is None:
            kwargs["config"] = load_checkpoint_config(pretrained_model_name_or_path)
        # Shape mismatches are collected rather than raised deep inside transformers, so that
        # the error below names the checkpoint and the weights.
        kwargs.setdefault("ignore_mismatched_sizes", True)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except WEIGHTS_FILE_ERRORS as error:
            raise unreadable_weights_error(pretrained_model_name_or_path, error) from error
        report_loading_info(cls.__name__, pretrained_model_name_or_path, info)
        return (model, info) if want_info else model


def encode_text(
    model: "BertCLIPModel | BertCLIPTextModel",
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
):
    """The text tower's outputs and its pooled sentence vector [batch, hidden] (before projection)."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if model.text_takes_token_type_ids:
        inputs["token_type_ids"] = token_type_ids
    text_outputs = model.text_model(**inputs)
    return text_outputs, pool_text(model.config.text_pooling, text_outputs, attention_mask)


class BertCLIPModel(BertCLIPPreTrainedModel):
    """CLIP ViT image tower + a text tower (BERT, RoBERTa, ERNIE, ...), each with a linear projection."""

    def __init__(self, config: BertCLIPConfig):
        super().__init__(config)
        self.text_model = build_text_tower(config.text_config, config.text_pooling)
        self.text_takes_token_type_ids = takes_token_type_ids(self.text_model)
        self.vision_model = CLIPVisionModel._from_config(config.vision_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(
            config.vision_config.hidden_size, config.projection_dim, bias=False
        )
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        # Only SigLIP models have a bias; older checkpoints then load with no missing key.
        self.logit_bias: nn.Parameter | None = None
        if config.logit_bias_init_value is not None:
            self.logit_bias = nn.Parameter(torch.tensor(config.logit_bias_init_value))
        self.post_init()

    @property
    def uses_sigmoid(self) -> bool:
        """True for a model with a logit bias: its scores are sigmoid match probabilities per pair,
        not a softmax over the candidates."""
        return self.logit_bias is not None

    def add_logit_bias(self, logit_scale: float, logit_bias: float) -> None:
        """Give the model a logit bias (for the SigLIP loss) and reset its logit scale.

        Training with the SigLIP loss calls this once for a model that has no bias yet, with
        `component.loss.SIGLIP_INIT_LOGIT_SCALE` and `SIGLIP_INIT_LOGIT_BIAS`. The bias is saved
        with the model from then on, and `config.logit_bias_init_value` records it.
        """
        scale = self.logit_scale
        with torch.no_grad():
            scale.fill_(logit_scale)
            if self.logit_bias is not None:  # keep the parameter object an optimizer may hold
                self.logit_bias.fill_(logit_bias)
        if self.logit_bias is None:
            self.logit_bias = nn.Parameter(torch.tensor(logit_bias, dtype=scale.dtype, device=scale.device))
        self.config.logit_bias_init_value = float(logit_bias)

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected text features, [batch, projection_dim], NOT L2-normalised.

        `token_type_ids` reach only towers with several token types (not RoBERTa or XLM-R).
        """
        _, pooled = encode_text(self, input_ids, attention_mask, token_type_ids)
        return self.text_projection(pooled)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features, [batch, projection_dim], NOT L2-normalised."""
        vision_outputs = self.vision_model(pixel_values=pixel_values)
        return self.visual_projection(vision_outputs.pooler_output)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        return_loss: bool = False,
        image_features: torch.Tensor | None = None,
        **kwargs,
    ) -> BertCLIPOutput:
        """Image-text logits, normalised embeddings and the scales; a loss when `return_loss`.

        The logits are exp(logit_scale) * cosine (+ logit_bias for a SigLIP model). Training picks
        its loss by name (`component.loss.get_loss`); `return_loss=True`, kept for transformers
        users, computes the model's natural one: "siglip" with a bias, "clip" without.
        `image_features` (projected, as `get_image_features` returns them) replace `pixel_values`
        when the image tower is locked and its outputs were cached.
        """
        if image_features is None:
            image_features = self.get_image_features(pixel_values)
        image_embeds = F.normalize(image_features, dim=-1)
        text_embeds = F.normalize(self.get_text_features(input_ids, attention_mask, token_type_ids), dim=-1)
        logits_per_text = text_embeds @ image_embeds.T * self.logit_scale.exp()  # [n_texts, n_images]
        if self.logit_bias is not None:
            logits_per_text = logits_per_text + self.logit_bias
        loss = None
        if return_loss:
            loss_function = get_loss("siglip" if self.uses_sigmoid else "clip")
            loss = loss_function(image_embeds, text_embeds, self.logit_scale, self.logit_bias)
        return BertCLIPOutput(
            loss=loss,
            logits_per_image=logits_per_text.T,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            logit_scale=self.logit_scale,
            logit_bias=self.logit_bias,
        )

    @classmethod
    def from_vision_text_pretrained(
        cls, clip_path: str, text_path: str, **config_overrides
    ) -> "BertCLIPModel":
        """Start from a CLIPModel checkpoint (image side) and any text encoder checkpoint (text side).

        The vision tower, `visual_projection` and `logit_scale` come from `clip_path`; the text
        tower from `text_path` through AutoModel (BERT, RoBERTa, XLM-R, ERNIE, ...);
        `text_projection` is new. `config_overrides` go to `BertCLIPConfig`.
        """
        for path in (clip_path, text_path):
            read_config_dict(path)  # a missing or mistyped path fails here, with its name
        clip = CLIPModel.from_pretrained(clip_path)
        text_tower, text_info = load_text_tower(text_path)
        report_loading_info("text tower", text_path, text_info)
        settings = {
            "projection_dim": clip.config.projection_dim,
            "logit_scale_init_value": float(clip.logit_scale.item()),
            **config_overrides,
        }
        config = BertCLIPConfig(
            text_config=text_tower.config.to_dict(),
            vision_config=clip.config.vision_config.to_dict(),
            **settings,
        )
        model = cls(config)
        if config.projection_dim != clip.config.projection_dim:
            raise CheckpointError(
                f"projection_dim={config.projection_dim} differs from {clip_path}'s "
                f"{clip.config.projection_dim}; the CLIP visual projection could not be reused"
            )
        model.vision_model.load_state_dict(clip.vision_model.state_dict())
        model.visual_projection.load_state_dict(clip.visual_projection.state_dict())
        with torch.no_grad():
            model.logit_scale.copy_(clip.logit_scale)
        result = model.text_model.load_state_dict(text_tower.state_dict(), strict=False)
        if result.missing_keys:
            raise CheckpointError(f"{text_path} lacks text-tower weights: {result.missing_keys}")
        if result.unexpected_keys:
            logger.warning(
                f"Not used from {text_path} (text_pooling={config.text_pooling!r}): {result.unexpected_keys}"
            )
        model.name_or_path = str(text_path)
        return model

    def to_chinese_clip(self):
        """A `transformers.ChineseCLIPModel` with the same weights and outputs (text_pooling "cls" only)."""
        from component.interop import to_chinese_clip

        return to_chinese_clip(self)

    def save_chinese_clip(self, save_directory: str | Path, processor=None) -> None:
        """Write a complete transformers ChineseCLIP directory (model plus `ChineseCLIPProcessor`).

        `processor` defaults to the one saved beside this model's checkpoint.
        """
        from component.interop import save_chinese_clip

        save_chinese_clip(self, save_directory, processor)

    def save_text_tower(self, save_directory: str | Path, tokenizer=None) -> None:
        """Write the text tower (and tokenizer) as a standalone directory that AutoModel loads."""
        from component.interop import save_text_tower

        save_text_tower(self, save_directory, tokenizer)

    def save_vision_tower(self, save_directory: str | Path, image_processor=None) -> None:
        """Write the image tower as a `CLIPVisionModelWithProjection` directory (with its image processor)."""
        from component.interop import save_vision_tower

        save_vision_tower(self, save_directory, image_processor)


class BertCLIPTextModel(BertCLIPPreTrainedModel):
    """The text half of BertCLIP (text tower + text projection); loads from a full BertCLIP checkpoint."""

    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [
        r"^vision_model\.",
        r"^visual_projection\.",
        r"^logit_scale$",
        r"^logit_bias$",
    ]

    def __init__(self, config: BertCLIPConfig):
        super().__init__(config)
        self.text_model = build_text_tower(config.text_config, config.text_pooling)
        self.text_takes_token_type_ids = takes_token_type_ids(self.text_model)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BertCLIPTextOutput:
        """Projected text embeddings plus the text tower's own outputs."""
        text_outputs, pooled = encode_text(self, input_ids, attention_mask, token_type_ids)
        return BertCLIPTextOutput(
            text_embeds=self.text_projection(pooled),
            last_hidden_state=text_outputs.last_hidden_state,
            pooler_output=getattr(text_outputs, "pooler_output", None),
        )
