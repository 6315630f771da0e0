"""Chinese CLIP toolkit: BertCLIP model, loss, data and training components.

Importing the package registers `BertCLIPConfig`/`BertCLIPModel` with transformers' Auto classes,
so `AutoModel.from_pretrained(dir)` returns a `BertCLIPModel` for a saved BertCLIP directory.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoProcessor,
    VisionTextDualEncoderProcessor,
)

from component.configuration import BertCLIPConfig
from component.model import BertCLIPModel, BertCLIPTextModel

AutoConfig.register(BertCLIPConfig.model_type, BertCLIPConfig, exist_ok=True)
AutoModel.register(BertCLIPConfig, BertCLIPModel, exist_ok=True)
AutoProcessor.register(BertCLIPConfig, VisionTextDualEncoderProcessor, exist_ok=True)

__all__ = ["BertCLIPConfig", "BertCLIPModel", "BertCLIPTextModel"]
