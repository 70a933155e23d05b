"""Inference: the test protocol, image loading and preprocessing, whole / sliding-window /
multi-scale inference, banded label maps, :class:`Segmenter` (torch or ONNX Runtime), visualization and
file prediction.

The protocol follows the reference (mmsegmentation-style) one: images are resized, keeping their
aspect ratio, to fit a ``(long, short)`` box (in whole mode the sides are then rounded up to a
multiple of 32), normalized with :data:`MEAN` / :data:`STD` (RGB, 0-255), run whole or with a
sliding window, and the logits are resized bilinearly back to the original size.
"""
from ..bands import BAND_BYTES, labels_from_logits
from ..data.transforms import MEAN, STD
from ..protocol import TestProtocol, protocol_size
from .images import ImageInput, as_chw, load_image
from .infer import image_probabilities, infer_logits, infer_tta, preprocess, segment_image, segment_input
from .onnx_backend import OnnxModel
from .segmenter import Segmenter
from .visualize import add_legend, colorize, confidence_image, overlay

__all__ = ["MEAN", "STD", "TestProtocol", "load_image", "as_chw", "protocol_size", "preprocess",
           "infer_logits", "infer_tta", "segment_input", "segment_image", "image_probabilities", "labels_from_logits",
           "BAND_BYTES", "Segmenter", "OnnxModel", "colorize", "overlay", "add_legend", "confidence_image", "ImageInput"]
