"""SegFormer (transformers ``SegformerConfig``) as a segmentor the trainer, evaluation and ISR
tools use like an EDAFormer model.

``create_model("segformer-b0", num_classes=11)`` builds the MiT-B0 encoder and the all-MLP decode
head with random weights (nothing is downloaded); ``model(images)`` returns logits ``(B, K, H, W)``
at the input size (the head's stride-4 logits resized bilinearly, ``align_corners=False``).

ISR: one average-pooling factor per encoder stage, applied by :mod:`edaformer.isr_adapters`
(``model.set_isr("2211")``). The EDAFormer form ``"2211-222"`` is accepted too, so that the same
sweep and tuning tools run unchanged, but its decoder part does nothing: the MLP decode head has no
attention and so no key/value pooling (as EDAFormer's ``dwconv`` / ``conv`` decoder ops).
``model.isr`` reports what runs: the encoder factors with decoder factors ``111``.

Needs the ``hf`` extra (``pip install edaformer[hf]``); importing this module does not import
transformers.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import isr_adapters
from ..isr import ISRSetting, ISRSpec, parse_isr, parse_stage_factors
from .fastpath import resize_bilinear

__all__ = ["SEGFORMER_SIZES", "SEGFORMER_OPTIONS", "SegFormer", "require_transformers"]

# MiT encoder sizes and decode-head width of the published variants (SegFormer paper, Table 6).
SEGFORMER_SIZES: dict[str, dict[str, list[int] | int]] = {
    "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 5, 8],
               sr_ratios=[8, 4, 2, 1], decoder_hidden_size=256),
    "b1": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 5, 8],
               sr_ratios=[8, 4, 2, 1], decoder_hidden_size=256),
}
# ``SegformerConfig`` fields a caller may override (e.g. a tiny variant for tests)
SEGFORMER_OPTIONS = ("hidden_sizes", "depths", "num_attention_heads", "sr_ratios", "mlp_ratios",
                     "decoder_hidden_size", "patch_sizes", "strides")
NUM_STAGES = 4
_NO_DECODER_ISR = (1, 1, 1)


def require_transformers():
    """The ``transformers`` module, or an ImportError saying how to install it."""
    try:
        import transformers  # an optional package (the hf extra)
    except ImportError as e:
        raise ImportError("SegFormer models need the transformers package: pip install edaformer[hf]") from e
    return transformers


class SegFormer(nn.Module):
    """MiT encoder (``encoder``: ``transformers.SegformerModel``) and all-MLP decode head (``decoder``:
    ``SegformerDecodeHead``); ``forward(images)`` returns logits at the input size.

    ``drop_path_rate``: encoder stochastic depth (rising linearly over the blocks); ``dropout``:
    dropout before the classifier; ``in_chans``: input channels; ``config``: further
    ``SegformerConfig`` fields (:data:`SEGFORMER_OPTIONS`).
    """

    def __init__(self, num_classes: int, *, drop_path_rate: float = 0.1, dropout: float = 0.1, in_chans: int = 3,
                 **config: Any):
        super().__init__()
        transformers = require_transformers()
        hf_config = transformers.SegformerConfig(num_labels=num_classes, num_channels=in_chans,
                                                 drop_path_rate=drop_path_rate, classifier_dropout_prob=dropout,
                                                 **config)
        if hf_config.num_encoder_blocks != NUM_STAGES:
            raise ValueError(f"SegFormer needs {NUM_STAGES} encoder stages (one ISR factor each), "
                             f"got num_encoder_blocks={hf_config.num_encoder_blocks}")
        full = transformers.SegformerForSemanticSegmentation(hf_config)  # its weight init, then split
        self.encoder = full.segformer
        self.decoder = full.decode_head
        self.num_classes = num_classes
        self.in_chans = in_chans
        self._spec = None

    @classmethod
    def from_config(cls, spec) -> "SegFormer":
        """Build from an :class:`~.config.HFSegFormerConfig` (a named model's), kept as ``spec``."""
        model = cls(spec.num_classes, drop_path_rate=spec.drop_path_rate, dropout=spec.dropout,
                    in_chans=spec.in_chans, **spec.segformer_options())
        model._spec = spec
        return model

    @property
    def config(self):
        """The ``transformers.SegformerConfig`` the model was built from."""
        return self.encoder.config

    @property
    def spec(self):
        """The :class:`~.config.HFSegFormerConfig` of :meth:`from_config` (None otherwise): the
        named model, its dataset and reference test protocol."""
        return self._spec

    @property
    def name(self) -> str | None:
        """The named model (``segformer-b0``), None when not built from a config."""
        return None if self._spec is None else self._spec.name

    def architecture_options(self) -> dict:
        """No architecture options beyond the model name (the EDAFormer ablation keys do not apply)."""
        return {}

    # ISR ---------------------------------------------------------------------------
    @property
    def isr(self) -> ISRSetting:
        """The active setting: encoder factors, decoder ``111`` (the decode head has no attention)."""
        return ISRSetting(isr_adapters.stage_factors(self), _NO_DECODER_ISR)

    @property
    def isr_pool(self) -> str:
        """How the ISR factors reduce the key/value tokens: average pooling, the only kind."""
        return "avg"

    def set_isr(self, spec: ISRSpec | Sequence[int], pool: str = "avg") -> "SegFormer":
        """Set one factor per encoder stage: ``"2211"``, ``(2, 2, 1, 1)``, or the EDAFormer form
        ``"2211-222"`` whose decoder part has no effect. Average pooling only; factor 1 leaves a
        stage exactly as built. A bad spec or pool raises ``ValueError`` and changes nothing."""
        if pool != "avg":
            raise ValueError(f"ISR pool {pool!r} is available for EDAFormer models only; SegFormer takes "
                             "average pooling (avg)")
        isr_adapters.set_stage_factors(self, encoder_factors(spec))
        return self

    def pool_ratios(self) -> dict[str, int]:
        """Key/value reduction per encoder stage under the active ISR (sequence reduction x factor)."""
        return {f"encoder.stage{i + 1}": r * f
                for i, (r, f) in enumerate(zip(self.config.sr_ratios, isr_adapters.stage_factors(self)))}

    def min_input_size(self) -> tuple[int, int]:
        """Smallest ``(height, width)`` the active ISR setting accepts: every stage grid must hold
        its reduction conv's window times its ISR factor."""
        cfg, need = self.config, 1
        for k, s, r in reversed(list(zip(cfg.patch_sizes, cfg.strides, self.pool_ratios().values()))):
            need = max(need, r)
            need = (need - 1) * s + k - 2 * (k // 2)  # the patch embedding's input for `need` outputs
        return need, need

    def check_input_size(self, height: int, width: int) -> None:
        """Raise ``ValueError`` if the active ISR setting does not fit a ``height x width`` input."""
        min_h, min_w = self.min_input_size()
        if height < min_h or width < min_w:
            raise ValueError(f"input {height}x{width} is too small for ISR {self.isr}: SegFormer needs at least "
                             f"{min_h}x{min_w}")

    # forward -------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The four encoder stage maps ``(B, C_i, H / 4 / 2^i, W / 4 / 2^i)``."""
        return self.encoder(x, output_hidden_states=True).hidden_states

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at stride 4 (the decode head's output, before the final resize)."""
        return self.decoder(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        return resize_bilinear(self.decode(x), x.shape[-2:])

    # training helpers ------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder blocks' activations in the backward pass (transformers' checkpointing)."""
        prefix = "activation" if hasattr(self.encoder, "activation_checkpointing_enable") else "gradient"
        if enable:
            getattr(self.encoder, f"{prefix}_checkpointing_enable")({"use_reentrant": False})
        else:
            getattr(self.encoder, f"{prefix}_checkpointing_disable")()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of parameters that take no weight decay: all normalization weights and biases."""
        return {f"{mod_name}.{p}" for mod_name, mod in self.named_modules()
                if isinstance(mod, (nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm))
                for p, _ in mod.named_parameters(recurse=False)}


def encoder_factors(spec: ISRSpec | Sequence[int]) -> tuple[int, ...]:
    """The encoder factors of ``"2211"`` / ``(2, 2, 1, 1)`` or of an EDAFormer spec ``"2211-222"``
    (7 integers, or an encoder / decoder pair); its decoder part is dropped."""
    if isinstance(spec, ISRSetting) or isinstance(spec, str) and "-" in spec:
        return parse_isr(spec).encoder
    if isinstance(spec, Sequence) and not isinstance(spec, str) and (
            len(spec) == 7 or len(spec) == 2 and all(isinstance(s, Sequence) for s in spec)):
        return parse_isr(spec).encoder
    return parse_stage_factors(spec, NUM_STAGES)

