"""Shared fixtures: tiny random towers and checkpoints built locally, never from the hub."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from component.model import BertCLIPModel
from component.processor import build_processor
from component.tiny import write_tiny_bert, write_tiny_clip


@pytest.fixture(scope="session")
def tiny_towers(tmp_path_factory) -> dict[str, Path]:
    """Paths of a tiny CLIPModel ('clip', 30 px images) and a tiny Chinese BertModel ('bert')."""
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    return {"clip": write_tiny_clip(root / "clip"), "bert": write_tiny_bert(root / "bert")}


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_towers, tmp_path_factory) -> Path:
    """A saved BertCLIP model plus processor directory (text_pooling 'cls', projection 16)."""
    directory = tmp_path_factory.mktemp("bert_clip")
    torch.manual_seed(0)
    model = BertCLIPModel.from_vision_text_pretrained(str(tiny_towers["clip"]), str(tiny_towers["bert"]))
    model.save_pretrained(directory)
    build_processor(tiny_towers["clip"], tiny_towers["bert"]).save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_model(tiny_checkpoint) -> BertCLIPModel:
    """A fresh copy of the tiny BertCLIP model in eval mode."""
    return BertCLIPModel.from_pretrained(tiny_checkpoint).eval()
