from step3vl.model.attention import AttentionBackend, DenseAttention
from step3vl.model.vlm import ImagePixels, Step3VLForCausalLM

__all__ = ["AttentionBackend", "DenseAttention", "ImagePixels", "Step3VLForCausalLM"]
