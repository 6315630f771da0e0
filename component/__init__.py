"""Chinese CLIP toolkit: BertCLIP model, loss, data and training components.

Importing the package registers `BertCLIPConfig`/`BertCLIPModel` with transformers' Auto classes,
so `AutoModel.from_pretrained(dir)` returns a `BertCLIPModel` for a saved BertCLIP directory, and
`pipeline("zero-shot-image-classification", model=dir)` runs on it.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    VisionTextDualEncoderProcessor,
)

from component.configuration import BertCLIPConfig
from component.model import BertCLIPModel, BertCLIPTextModel

AutoConfig.register(BertCLIPConfig.model_type, BertCLIPConfig, exist_ok=True)
AutoModel.register(BertCLIPConfig, BertCLIPModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(BertCLIPConfig, BertCLIPModel, exist_ok=True)
AutoProcessor.register(BertCLIPConfig, VisionTextDualEncoderProcessor, exist_ok=True)

__all__ = ["BertCLIPConfig", "BertCLIPModel", "BertCLIPTextModel"]
