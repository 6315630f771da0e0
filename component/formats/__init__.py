"""Other checkpoint formats: Chinese-CLIP (cn_clip) checkpoints and ONNX export."""
