"""Routed LoRA experts on an ``nn.Conv2d`` (PEFT's ``lora.Conv2d``, as a mixture).

PEFT's Conv2d LoRA is a conv ``A`` from ``c_in`` to ``r`` channels with the base layer's kernel
size, stride and padding (``lora_A [r, c_in, k_h, k_w]``), then a 1x1 conv ``B`` back to
``c_out`` (``lora_B [c_out, r, 1, 1]``): ``y = conv(x, W0) + s B * (A * x)``. With E experts behind
a router, per output pixel ``p`` (Hu et al., 2021; routed as in MoLoRA / LoRAMoE):

    y[:, p] = conv(x, W0)[:, p] + sum_e g_e(p) s_e B_e (A_e * x)[:, p]

The shrink is one conv to ``E r`` channels (every expert's kernels stacked), the expand the
kernels' dense gate-and-expand on the ``[N H' W', E r]`` rank features, i.e. the gated 1x1 conv
(:mod:`molora.routed_rank`). The bank holds ``A_e`` flattened, ``[r, c_in k_h k_w]``, so that
``B_e A_e`` is the delta of the base kernel flattened (merging folds it back into ``W0``).

A per-layer router scores each output pixel's input channels ``[c_in]``: ``x`` itself where the
conv keeps the size, else ``x`` average-pooled to the output grid (a strided conv's pixel sees
the block it covers). Shared routers (task ids, timesteps, ...) decide per example. LoRA dropout
applies to the shrink's input, as in PEFT.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from molora.errors import MoLoRAError
from molora.routed_rank import RoutedRankLayer


class RoutedConv2d(RoutedRankLayer):
    """A frozen ``nn.Conv2d`` with a bank of LoRA experts (``A_e [r_e, c_in k_h k_w]``,
    ``B_e [c_out, r_e]``) behind a router; arguments as :class:`~molora.layer.RoutedLoRALinear`.

    The base conv must have ``groups=1``, ``dilation=1`` (PEFT's ``lora_A`` uses neither, so the
    delta would not be a delta of the base kernel) and zero padding (the shrink pads with zeros,
    as PEFT's ``lora_A``: with other padding merging would not be exact).
    """

    @staticmethod
    def _check_base(base_layer: nn.Module, name: str) -> None:
        if not isinstance(base_layer, nn.Conv2d):
            raise MoLoRAError(f"module {name!r}: RoutedConv2d wraps an nn.Conv2d; got {type(base_layer).__name__}")
        bad = {k: v for k, v in (("groups", base_layer.groups), ("dilation", base_layer.dilation),
                                 ("padding_mode", base_layer.padding_mode))
               if v != {"groups": 1, "dilation": (1, 1), "padding_mode": "zeros"}[k]}
        if bad:
            got = ", ".join(f"{k}={v!r}" for k, v in bad.items())
            raise MoLoRAError(f"module {name!r}: molora routes LoRA on nn.Conv2d with groups=1, dilation=1 and "
                              f"padding_mode='zeros' (as PEFT's lora_A computes); this one has {got}")

    @staticmethod
    def router_dim(base_layer: nn.Module) -> int:
        """The router scores an output pixel's input channels: ``in_channels``."""
        return base_layer.in_channels

    def peft_factors(self, A: Tensor, B: Tensor) -> dict[str, Tensor]:
        kh, kw = self.base_layer.kernel_size
        return {"lora_A.weight": A.reshape(A.shape[0], -1, kh, kw), "lora_B.weight": B.reshape(*B.shape, 1, 1)}

    # the wrapped layer's face (model code reads these on its convs)
    @property
    def in_channels(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_channels(self) -> int:
        return self.base_layer.out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.base_layer.kernel_size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.base_layer.stride

    @property
    def padding(self) -> tuple[int, ...] | str:
        return self.base_layer.padding

    def _shrink(self, x: Tensor, result: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        base = self.base_layer
        x4 = x if x.dim() == 4 else x.unsqueeze(0)  # nn.Conv2d also takes one unbatched [c_in, H, W]
        kernels = A.reshape(-1, base.in_channels, *base.kernel_size)  # [E r, c_in, kh, kw]: one conv for all experts
        xd = self.dropout(x4.to(A.dtype))
        h = F.conv2d(xd, kernels, None, base.stride, base.padding)  # [N, E r, H', W']
        n, c, hh, ww = h.shape
        h = h.permute(0, 2, 3, 1).reshape(n * hh * ww, c)
        rows = x4 if tuple(x4.shape[-2:]) == (hh, ww) else F.adaptive_avg_pool2d(x4, (hh, ww))
        return h, rows.permute(0, 2, 3, 1).reshape(n, hh * ww, base.in_channels)

    def _add_delta(self, result: Tensor, delta: Tensor) -> Tensor:
        r4 = result if result.dim() == 4 else result.unsqueeze(0)
        n, c, hh, ww = r4.shape
        out = r4 + delta.view(n, hh, ww, c).permute(0, 3, 1, 2)
        return out if result.dim() == 4 else out.squeeze(0)
