"""STEP3-VL input processing: images → encoder views, text/chat → token ids with image layouts."""

from step3vl.processor.chat import CHATML_TEMPLATE, render_chat, split_images
from step3vl.processor.image import (
    CropPlan,
    ImageError,
    ImageSpec,
    ImageViews,
    load_image,
    plan_image,
    preprocess_image,
)
from step3vl.processor.processor import ProcessedInput, Step3VLProcessor
from step3vl.processor.tokenizer import StreamDecoder, Step3VLTokenizer
from step3vl.processor.tokens import (
    IMAGE_PLACEHOLDER,
    ImageTokenIds,
    TokenLayout,
    image_token_ids,
    image_token_string,
    num_image_tokens,
)

__all__ = [
    "CHATML_TEMPLATE",
    "CropPlan",
    "IMAGE_PLACEHOLDER",
    "ImageError",
    "ImageSpec",
    "ImageTokenIds",
    "ImageViews",
    "ProcessedInput",
    "Step3VLProcessor",
    "Step3VLTokenizer",
    "StreamDecoder",
    "TokenLayout",
    "image_token_ids",
    "image_token_string",
    "load_image",
    "num_image_tokens",
    "plan_image",
    "preprocess_image",
    "render_chat",
    "split_images",
]
