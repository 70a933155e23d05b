"""EDAFormer: EFT encoder + all-attention decoder, with run-time ISR."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..isr import TRAINING_ISR, ISRSetting, ISRSpec, parse_isr
from . import reduction
from .config import EDAFormerConfig
from .decoder import DECODER_TRAIN_RATIOS, AllAttentionDecoder
from .efa import EFA
from .eft import EFT, TRAIN_POOL_RATIOS
from .fastpath import resize_bilinear

__all__ = ["EDAFormer"]


class EDAFormer(nn.Module):
    """Semantic segmentor. ``model(x)`` returns logits ``(B, K, H, W)`` at the input size.

    The network runs on the raw input (no padding or resizing); the decoder's
    stride-8 logits are resized bilinearly (``align_corners=False``).

    Built from an :class:`~.config.EDAFormerConfig` (``EDAFormer(config)``; keywords replace
    its fields: ``EDAFormer(config, num_classes=19)``, ``EDAFormer(decoder_op="conv")`` on the
    default config) and kept as ``model.config``; ``model.name`` and ``model.spec`` (the
    named model and its test protocol) are read from it. The architecture options of the
    paper's ablations (the defaults are the reference model):

    * ``decoder_depths``: decoder blocks at (c4, c3, c2), the paper's {a-b-c}, default
      ``(3, 2, 1)``; 0 at a level means no block there (its map goes straight to the fuse).
    * ``decoder_op``: the decoder's token mixer, one of :data:`~.mixers.DECODER_OPS`
      (``efa``, the default; :mod:`.mixers`).
    * ``train_isr``: an ISR spec baked into the training pooling ratios, e.g. ``"2211-222"``
      trains with every ratio multiplied by those factors. Recorded as ``train_isr``;
      ``isr == 1111-111`` then means "the ratios the model was trained with", and an ISR
      setting at inference multiplies on top of them.
    """

    def __init__(self, config: EDAFormerConfig | None = None, **options: Any):
        super().__init__()
        config = EDAFormerConfig() if config is None else config
        if options:
            config = config.replace(**options)
        self._config = config
        self.num_classes = config.num_classes
        self.train_isr = parse_isr(config.train_isr)
        enc_ratios = tuple(r * f for r, f in zip(TRAIN_POOL_RATIOS, self.train_isr.encoder))
        dec_ratios = tuple(r * f for r, f in zip(DECODER_TRAIN_RATIOS, self.train_isr.decoder))
        self.encoder = EFT(config.embed_dims, config.num_heads, config.depths, config.mlp_ratio,
                           in_chans=config.in_chans, num_classes=0, drop_path_rate=config.drop_path_rate,
                           pool_ratios=enc_ratios)
        self.decoder = AllAttentionDecoder(config.embed_dims[1:], config.num_classes, config.decoder_dim,
                                           config.decoder_mlp_ratio, drop_path=config.decoder_drop_path,
                                           dropout=config.dropout, depths=config.decoder_depths,
                                           op=config.decoder_op, train_ratios=dec_ratios)
        self._isr = TRAINING_ISR
        self._isr_pool = "avg"
        if config.isr_pool != self._isr_pool:
            self.set_isr(TRAINING_ISR, pool=config.isr_pool)

    @property
    def config(self) -> EDAFormerConfig:
        """What the model was built from (frozen; the run-time ISR setting is :attr:`isr`)."""
        return self._config

    @property
    def name(self) -> str | None:
        """The named model (``edaformer-t-ade20k``), None for a config of one's own."""
        return self._config.name

    @property
    def spec(self) -> EDAFormerConfig:
        """The config, read for its dataset and reference test protocol (as SegFormer's ``spec``)."""
        return self._config

    @property
    def decoder_depths(self) -> tuple[int, int, int]:
        """Decoder blocks at (c4, c3, c2)."""
        return self.decoder.depths

    @property
    def decoder_op(self) -> str:
        """The decoder's token mixer."""
        return self.decoder.op

    def architecture_options(self) -> dict:
        """The architecture options as ``create_model`` keywords (plain values, e.g. for checkpoint meta)."""
        return self._config.architecture_options()

    # ISR ---------------------------------------------------------------------------
    @property
    def isr(self) -> ISRSetting:
        """The active ISR setting (``1111-111`` = training pooling ratios)."""
        return self._isr

    @property
    def isr_pool(self) -> str:
        """How the active ISR factors reduce the key/value tokens (:mod:`.reduction`)."""
        return self._isr_pool

    def set_isr(self, spec: ISRSpec, pool: str = "avg") -> "EDAFormer":
        """Set the ISR factors, e.g. ``"2211-222"``, and how they reduce the key/value tokens:
        ``pool``, one of :data:`~.reduction.ISR_POOLS`: ``avg`` (the reference), ``max``,
        ``overlap`` or ``merge`` (factors 1 and 2 only), see :mod:`edaformer.models.reduction`. No rebuild, no weight change; on a bad spec
        or pool the previous setting stays. Factors of decoder levels without key/value pooling
        (``decoder_op`` ``dwconv`` / ``conv``) do nothing.
        """
        setting = parse_isr(spec)
        reduction.check_pool(pool)
        previous = self._isr, self._isr_pool
        try:
            self.encoder.set_isr(setting.encoder, pool)
            self.decoder.set_isr(setting.decoder, pool)
        except ValueError:
            self.encoder.set_isr(previous[0].encoder, previous[1])
            self.decoder.set_isr(previous[0].decoder, previous[1])
            raise
        self._isr, self._isr_pool = setting, pool
        return self

    def attention_layers(self) -> list[tuple[str, EFA]]:
        """Every EFA module with its qualified name, encoder first."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, EFA)]

    def pool_ratios(self) -> dict[str, int]:
        """Pooling ratio per encoder stage and decoder level under the active ISR (decoder levels
        without key/value pooling are left out)."""
        out = {f"encoder.stage{i + 1}": r for i, r in enumerate(self.encoder.pool_ratios())}
        out.update({f"decoder.c{i + 2}": r for i, r in enumerate(self.decoder.pool_ratios()) if r is not None})
        return out

    def check_input_size(self, height: int, width: int) -> None:
        """Raise ``ValueError`` if the active ISR would pool some map to zero rows/columns."""
        sizes = self.encoder.check_input_size(height, width)
        self.decoder.check_input_size(sizes[1:])

    def min_input_size(self) -> tuple[int, int]:
        """Smallest ``(height, width)`` the active ISR setting accepts, in closed form.

        Each encoder stage grid must hold its own pooling window and, for stages 2-4, that of
        the decoder level reading it (levels without pooling ask nothing); the encoder inverts
        its conv geometry for those minima.
        """
        minima = list(self.encoder.pool_ratios())
        for i, r in enumerate(self.decoder.pool_ratios(), start=len(minima) - len(self.decoder.levels())):
            if r is not None:
                minima[i] = max(minima[i], r)
        return self.encoder.min_input_size(minima)

    # forward -------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four encoder stage maps."""
        return self.encoder.forward_stages(x)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at stride 8 (the decoder output, before the final resize)."""
        return self.decoder(self.forward_features(x)[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.encoder.stages[0].downsample.proj.in_channels:
            raise ValueError(f"expected input (B, {self.encoder.stages[0].downsample.proj.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        logits = self.decode(x)
        return resize_bilinear(logits, x.shape[-2:])

    # training helpers ----------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of parameters that take no weight decay: all normalization weights and biases."""
        names = set()
        for mod_name, mod in self.named_modules():
            if isinstance(mod, (nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)):
                names.update(f"{mod_name}.{p}" for p, _ in mod.named_parameters(recurse=False))
        return names
