"""edaformer: EDAFormer semantic segmentation (EFT encoder, all-attention decoder, ISR)."""
from .checkpoint import export_reference, load_checkpoint, save_checkpoint
from .export import export_onnx
from .flops import count_flops
from .isr import ISRSetting, isr, parse_isr, set_isr
from .models import EFT, EDAFormer, create_model, list_models
from .inference import Segmenter
from .pretrained import list_pretrained, load_pretrained

__version__ = "0.1.0"

__all__ = ["EDAFormer", "EFT", "create_model", "list_models", "load_checkpoint", "save_checkpoint",
           "export_reference", "isr", "set_isr", "parse_isr", "ISRSetting", "count_flops", "Segmenter", "export_onnx",
           "load_pretrained", "list_pretrained", "__version__"]
