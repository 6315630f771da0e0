"""Shared fixtures: tiny random towers and checkpoints built locally, never from the hub."""

import os
from pathlib import Path

import pytest
import torch
from _runs import write_shapes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from component.model import BertCLIPModel
from component.testing.tiny import write_bert_clip, write_tiny_bert, write_tiny_clip


@pytest.fixture(scope="session")
def tiny_towers(tmp_path_factory) -> dict[str, Path]:
    """Paths of a tiny CLIPModel ('clip', 30 px images) and a tiny Chinese BertModel ('bert')."""
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    return {"clip": write_tiny_clip(root / "clip"), "bert": write_tiny_bert(root / "bert")}


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_towers, tmp_path_factory) -> Path:
    """A saved BertCLIP model plus processor directory (text_pooling 'cls', projection 16)."""
    torch.manual_seed(0)
    return write_bert_clip(tmp_path_factory.mktemp("bert_clip"), tiny_towers["clip"], tiny_towers["bert"])


@pytest.fixture
def tiny_model(tiny_checkpoint) -> BertCLIPModel:
    """A fresh copy of the tiny BertCLIP model in eval mode."""
    return BertCLIPModel.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """40 training and 16 test images of coloured shapes with Chinese captions (train.csv, test.csv)."""
    return write_shapes(tmp_path_factory.mktemp("perf_shapes"), train=40, test=16, seed=1)
