"""Tiny local stand-ins for the pretrained towers, for tests, the offline demo and benchmarks.

Nothing here touches the model hub: the vocabulary is the CJK Unified Ideographs block plus
ASCII and Chinese punctuation, and the towers (CLIP, BERT, XLM-RoBERTa, ERNIE) are random and small.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    ErnieConfig,
    ErnieModel,
    PreTrainedTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaModel,
)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHINESE_PUNCTUATION = "，。！？、；：“”‘’（）《》【】…—·"


def chinese_vocabulary() -> list[str]:
    """Special tokens, ASCII printable characters, Chinese punctuation and U+4E00..U+9FA5."""
    ascii_chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]  # the tokenizer lower-cases
    word_pieces = [f"##{c}" for c in ascii_chars if c.isalnum()]  # so Latin words and numbers split
    cjk = [chr(c) for c in range(0x4E00, 0x9FA6)]
    return SPECIAL_TOKENS + ascii_chars + word_pieces + list(CHINESE_PUNCTUATION) + cjk


def write_chinese_tokenizer(directory: str | Path) -> BertTokenizerFast:
    """Write vocab.txt plus a fast tokenizer into `directory` and return the tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(chinese_vocabulary()) + "\n", encoding="utf-8")
    # BertTokenizerFast(vocab_file=...) ignores the file in transformers 5; from_pretrained reads it.
    tokenizer = BertTokenizerFast.from_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def tiny_bert_config(vocab_size: int, hidden_size: int = 32, layers: int = 2) -> BertConfig:
    """A BERT of `layers` layers and `hidden_size` width, 4 heads."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=128,
    )


def write_tiny_bert(directory: str | Path, hidden_size: int = 32, layers: int = 2) -> Path:
    """A random BertModel plus the Chinese tokenizer, saved like a hub BERT checkpoint."""
    directory = Path(directory)
    tokenizer = write_chinese_tokenizer(directory)
    model = BertModel(tiny_bert_config(len(tokenizer), hidden_size, layers))
    model.save_pretrained(str(directory))
    return directory


def _tiny_encoder_settings(hidden_size: int, layers: int) -> dict:
    return dict(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden_size * 2,
    )


# XLM-R's special tokens and their ids (<mask> is the last id, as in XLM-R).
ROBERTA_SPECIAL_TOKENS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


def write_roberta_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """A fast XLM-R-style tokenizer over the Chinese vocabulary: <s> text </s>, no token types.

    WordPiece over `chinese_vocabulary()` stands in for XLM-R's sentencepiece model, which cannot
    be built offline; the special tokens, their ids and the templates are XLM-R's.
    """
    specials = list(ROBERTA_SPECIAL_TOKENS.values())
    vocabulary = specials + chinese_vocabulary()[len(SPECIAL_TOKENS) :] + ["<mask>"]
    backend = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocabulary)}, unk_token="<unk>"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **ROBERTA_SPECIAL_TOKENS,
        cls_token="<s>",
        sep_token="</s>",
        mask_token="<mask>",
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def write_tiny_roberta(directory: str | Path, hidden_size: int = 32, layers: int = 2) -> Path:
    """A random XLMRobertaModel (one token type, padding-aware positions) plus its tokenizer."""
    directory = Path(directory)
    tokenizer = write_roberta_tokenizer(directory)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=130,  # XLM-R positions start after the padding id
        type_vocab_size=1,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **_tiny_encoder_settings(hidden_size, layers),
    )
    XLMRobertaModel(config).save_pretrained(str(directory))
    return directory


def write_tiny_ernie(directory: str | Path, hidden_size: int = 32, layers: int = 2) -> Path:
    """A random ErnieModel (ERNIE 3.0's 4 token types and task ids) plus the Chinese BERT tokenizer."""
    directory = Path(directory)
    tokenizer = write_chinese_tokenizer(directory)
    config = ErnieConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        type_vocab_size=4,
        use_task_id=True,
        task_type_vocab_size=3,
        **_tiny_encoder_settings(hidden_size, layers),
    )
    ErnieModel(config).save_pretrained(str(directory))
    return directory


def write_tiny_clip(
    directory: str | Path,
    image_size: int = 30,
    patch_size: int = 6,
    hidden_size: int = 32,
    layers: int = 2,
    projection_dim: int = 16,
) -> Path:
    """A random CLIPModel plus its image processor, saved like a hub CLIP checkpoint."""
    directory = Path(directory)
    vision = dict(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden_size * 2,
    )
    # BertCLIP does not use the CLIP text tower; it only has to exist in the checkpoint.
    text = dict(
        vocab_size=99,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=32,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(str(directory))
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    ).save_pretrained(str(directory))
    return directory


def write_bert_clip(
    directory: str | Path, clip_path: str | Path, text_path: str | Path, **config_overrides
) -> Path:
    """A BertCLIP checkpoint started from two tower checkpoints, saved with its processor."""
    from component.model import BertCLIPModel
    from component.processor import build_processor

    directory = Path(directory)
    model = BertCLIPModel.from_vision_text_pretrained(str(clip_path), str(text_path), **config_overrides)
    model.save_pretrained(directory)
    build_processor(clip_path, text_path).save_pretrained(directory)
    return directory
