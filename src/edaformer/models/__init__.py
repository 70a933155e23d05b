"""EDAFormer models: EFT encoder, all-attention decoder, segmentor, registry."""
from .decoder import AllAttentionDecoder
from .efa import EFA, EFABlock
from .eft import EFT, eft_b, eft_t
from .registry import MODEL_SPECS, ModelSpec, create_model, get_model_spec, list_models
from .segmentor import EDAFormer

__all__ = ["EFA", "EFABlock", "EFT", "eft_t", "eft_b", "AllAttentionDecoder", "EDAFormer", "ModelSpec",
           "MODEL_SPECS", "create_model", "get_model_spec", "list_models"]
