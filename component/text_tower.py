"""The text tower: any transformers text encoder, built through AutoModel, and its sentence vector.

A new tower (BERT and RoBERTa-wwm, ERNIE, XLM-R, multilingual-e5, ...) is a `text_config`, not a
new class: `AutoModel` builds it from the config, and the helpers here handle what differs between
towers (whether there is a pooler, whether token type ids are taken).
"""

import inspect

import torch
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from component.errors import CheckpointError


def text_tower_class(text_config: PreTrainedConfig) -> type[PreTrainedModel]:
    """The transformers model class AutoModel builds for `text_config`."""
    try:
        return MODEL_MAPPING[type(text_config)]
    except KeyError:
        raise CheckpointError(
            f"text_config has model_type {text_config.model_type!r}, which transformers' AutoModel "
            "cannot build; give a text encoder such as BERT, RoBERTa, XLM-R or ERNIE"
        ) from None


def build_text_tower(text_config: PreTrainedConfig, text_pooling: str) -> PreTrainedModel:
    """A randomly initialised tower for `text_config`, with a pooler only when `text_pooling` uses it.

    Leaving out an unused pooler lets ChineseCLIP checkpoints (which have none) load without
    missing weights. Raises `CheckpointError` for "pooler" with a tower that has no pooler.
    """
    model_class = text_tower_class(text_config)
    options = {}
    if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        options["add_pooling_layer"] = text_pooling == "pooler"
    tower = AutoModel.from_config(text_config, **options)
    if text_pooling == "pooler" and getattr(tower, "pooler", None) is None:
        raise CheckpointError(
            f"text_pooling 'pooler' needs a text tower with a pooler, and {model_class.__name__} has "
            "none; use text_pooling 'cls' or 'mean'"
        )
    return tower


def takes_token_type_ids(tower: PreTrainedModel) -> bool:
    """True when the tower has more than one token type: only those are given token type ids.

    RoBERTa and XLM-R have a single type (`type_vocab_size` 1), and towers such as DistilBERT take
    no such argument at all.
    """
    takes_argument = "token_type_ids" in inspect.signature(tower.forward).parameters
    return takes_argument and getattr(tower.config, "type_vocab_size", 0) > 1


def masked_mean(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of `hidden_states` [batch, tokens, hidden] over the tokens the mask keeps."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    weights = attention_mask.unsqueeze(-1).to(hidden_states.dtype)  # [batch, tokens, 1]
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def pool_text(text_pooling: str, text_outputs, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The tower's sentence vector, [batch, hidden]: first token, pooler output or masked mean."""
    if text_pooling == "pooler":
        return text_outputs.pooler_output
    if text_pooling == "mean":
        return masked_mean(text_outputs.last_hidden_state, attention_mask)
    return text_outputs.last_hidden_state[:, 0, :]


def load_text_tower(path: str) -> tuple[PreTrainedModel, dict]:
    """A pretrained text encoder through AutoModel, and its loading info (missing, unexpected keys)."""
    return AutoModel.from_pretrained(str(path), output_loading_info=True)


def max_text_length(text_config: PreTrainedConfig) -> int:
    """The most tokens the tower takes: its position table, less the offset RoBERTa-style towers
    (RoBERTa, XLM-R, CamemBERT) give positions, which start after the padding id."""
    positions = text_config.max_position_embeddings
    if "roberta" in text_config.model_type or text_config.model_type == "camembert":
        return positions - (text_config.pad_token_id or 0) - 1
    return positions
