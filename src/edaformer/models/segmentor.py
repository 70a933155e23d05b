"""EDAFormer: EFT encoder + all-attention decoder, with run-time ISR."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..isr import ISRSetting, ISRSpec, parse_isr
from .decoder import AllAttentionDecoder
from .efa import EFA
from .eft import EFT
from .fastpath import resize_bilinear

__all__ = ["EDAFormer"]


class EDAFormer(nn.Module):
    """Semantic segmentor. ``model(x)`` returns logits ``(B, K, H, W)`` at the input size.

    The network runs on the raw input (no padding or resizing); the decoder's
    stride-8 logits are resized bilinearly (``align_corners=False``).
    """

    def __init__(self, embed_dims: Sequence[int], num_heads: Sequence[int], depths: Sequence[int],
                 mlp_ratio: float, num_classes: int, decoder_dim: int, decoder_mlp_ratio: float,
                 drop_path_rate: float = 0.2, decoder_drop_path: float = 0.1, dropout: float = 0.1,
                 in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.encoder = EFT(embed_dims, num_heads, depths, mlp_ratio, in_chans=in_chans, num_classes=0,
                           drop_path_rate=drop_path_rate)
        self.decoder = AllAttentionDecoder(embed_dims[1:], num_classes, decoder_dim, decoder_mlp_ratio,
                                           drop_path=decoder_drop_path, dropout=dropout)
        self._isr = parse_isr("1111-111")

    # ISR ---------------------------------------------------------------------------
    @property
    def isr(self) -> ISRSetting:
        """The active ISR setting (``1111-111`` = training pooling ratios)."""
        return self._isr

    def set_isr(self, spec: ISRSpec) -> "EDAFormer":
        """Set the ISR factors, e.g. ``"2211-222"``; no rebuild, no weight change."""
        setting = parse_isr(spec)
        self.encoder.set_isr(setting.encoder)
        self.decoder.set_isr(setting.decoder)
        self._isr = setting
        return self

    def attention_layers(self) -> list[tuple[str, EFA]]:
        """Every EFA module with its qualified name, encoder first."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, EFA)]

    def pool_ratios(self) -> dict[str, int]:
        """Pooling ratio per encoder stage and decoder level under the active ISR."""
        out = {f"encoder.stage{i + 1}": r for i, r in enumerate(self.encoder.pool_ratios())}
        out.update({f"decoder.c{i + 2}": r for i, r in enumerate(self.decoder.pool_ratios())})
        return out

    def check_input_size(self, height: int, width: int) -> None:
        """Raise ``ValueError`` if the active ISR would pool some map to zero rows/columns."""
        sizes = self.encoder.check_input_size(height, width)
        self.decoder.check_input_size(sizes[1:])

    def min_input_size(self) -> tuple[int, int]:
        """Smallest ``(height, width)`` the active ISR setting accepts, in closed form.

        Each encoder stage grid must hold its own pooling window and, for stages 2-4, that of
        the decoder level reading it; the encoder inverts its conv geometry for those minima.
        """
        minima = list(self.encoder.pool_ratios())
        for i, r in enumerate(self.decoder.pool_ratios(), start=len(minima) - len(self.decoder.levels())):
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
