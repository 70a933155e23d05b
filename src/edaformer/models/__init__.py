"""EDAFormer models: EFT encoder, all-attention decoder, segmentor, model configs, registry."""
from .config import ARCHITECTURE_KEYS, TEST_MODES, EDAFormerConfig, HFSegFormerConfig, ModelConfig
from .decoder import DECODER_DEPTHS, AllAttentionDecoder
from .efa import EFA, EFABlock
from .eft import EFT, eft_b, eft_t
from .mixers import DECODER_OPS, Attention
from .reduction import ISR_POOLS
from .registry import MODEL_SPECS, create_model, get_model_spec, list_models
from .segmentor import EDAFormer

__all__ = ["EFA", "EFABlock", "Attention", "EFT", "eft_t", "eft_b", "AllAttentionDecoder", "EDAFormer",
           "ModelConfig", "EDAFormerConfig", "HFSegFormerConfig", "MODEL_SPECS", "create_model", "get_model_spec",
           "list_models", "DECODER_DEPTHS", "DECODER_OPS", "ISR_POOLS", "TEST_MODES", "ARCHITECTURE_KEYS"]
