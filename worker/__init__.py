"""LoraCast's edge worker: the frozen base model in ONNX Runtime, adapters applied without re-export."""
