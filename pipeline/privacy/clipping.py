"""Per-sample gradient clipping in one backward pass, for Conv2d, Linear and GroupNorm networks.

DP-SGD needs, for every example ``i`` of a batch, the norm of its own gradient ``g_i`` and
then ``sum_i min(1, C / |g_i|) g_i``. Opacus's grad-sample modes materialise every ``g_i``
through ``unfold`` (hooks), ``vmap`` (functorch) or expanded weights, or run the backward
pass twice (ghost clipping): 2.7x to 4.2x the non-private step for a group-norm ResNet-18 at
224 px on a 2-core CPU. This clipper runs the backward pass once, for the layers' *outputs*
only (no weight gradients), then per layer picks the cheaper exact way to the per-sample norms:

* many output positions (early convolutions): the per-sample weight gradients themselves,
  from one grouped convolution backward (one group per example), then a weighted sum;
* few output positions (late convolutions): the ghost norm
  ``|g_i|^2 = <A_i^T A_i, B_i^T B_i>`` from the Gram matrices of the unfolded input ``A_i``
  and output gradient ``B_i``, then one ordinary weight-gradient convolution on the output
  gradients scaled by each example's clipping factor.

The result, ``sum_i c_i g_i`` in ``p.grad``, is what Opacus's
``DPOptimizerFastGradientClipping`` expects: it adds the Gaussian noise and scales.

Augmentation multiplicity (De et al. 2022): with ``views=K`` the batch holds K augmented views
of every sampled example, each example's views consecutive. An example's gradient ``g_i`` is
then the *mean* of its views' gradients, clipped once: its views are one example (their
positions concatenated for the ghost norm and linear layers, their per-sample gradients summed
elsewhere), so the noise and the privacy accounting stay per example.

Weight-standardised convolutions (:class:`models.weight_standardisation.WSConv2d`): a gradient
``g`` with respect to the standardised kernel ``w_hat`` maps, per output channel, to the raw
weight by the standardisation's Jacobian, ``J g = (g - mean(g) - w_hat * mean(g * w_hat)) /
sigma`` with ``sigma = sqrt(var(w) + eps)``. The materialised path applies it to each
per-sample gradient; the ghost norm uses ``|J g|^2``, which is ``|g|^2 / sigma^2`` less the
parts of ``g`` along the constant and ``w_hat`` directions (see
:meth:`_Conv2dLayer._standardised_ghost_norms`), and the clipped sum is ``J`` of the ordinary one.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from models.weight_standardisation import WSConv2d

# Exact types: a subclass may compute something else in its forward (WSConv2d is handled).
SUPPORTED = (nn.Conv2d, WSConv2d, nn.Linear, nn.GroupNorm)
Record = tuple[nn.Module, torch.Tensor, torch.Tensor]


def unsupported_layers(net: nn.Module) -> list[str]:
    """Names of the layers with trainable parameters this clipper cannot handle."""
    names = []
    for name, module in net.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(module) not in SUPPORTED:
            names.append(f"{name} ({type(module).__name__})")
        elif isinstance(module, nn.Conv2d) and (
            module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros"
        ):
            names.append(f"{name} (Conv2d with groups, string padding or padding_mode other than zeros)")
    return names


class PerSampleClipper:
    """Records each supported layer's input and output during training forwards, and turns a
    batch loss into clipped, summed per-sample gradients in ``p.grad``.

    ``views``: consecutive rows of a batch that are views of one example (augmentation
    multiplicity); 1: every row is an example.
    """

    def __init__(self, net: nn.Module, max_grad_norm: float, views: int = 1) -> None:
        unsupported = unsupported_layers(net)
        if unsupported:
            raise ValueError(
                "per-sample clipping supports Conv2d, WSConv2d, Linear and GroupNorm layers only; "
                f"this model also trains {', '.join(unsupported)}: use model=resnet18_groupnorm"
            )
        if views < 1:
            raise ValueError(f"privacy.augmentation_multiplicity must be at least 1, got {views}")
        self.views = views
        self.max_grad_norm = float(max_grad_norm)
        self.records: list[Record] = []
        self.handles = [
            module.register_forward_hook(self._record)
            for module in net.modules()
            if isinstance(module, SUPPORTED) and any(p.requires_grad for p in module.parameters())
        ]

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            self.records.append((module, inputs[0].detach(), output))

    def remove(self) -> None:
        """Detach from the network."""
        for handle in self.handles:
            handle.remove()
        self.records = []

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Write ``sum_i min(1, C / |g_i|) g_i`` into every parameter's ``.grad``.

        ``loss`` is the batch *mean* (over all views); returns the per-example gradient norms
        ``|g_i|``, ``g_i`` the mean of example ``i``'s views' gradients.
        """
        records, self.records = self.records, []
        if not records:
            raise RuntimeError("no training forward pass was recorded before backward()")
        rows = records[0][1].shape[0]
        if rows % self.views:
            raise ValueError(f"a batch of {rows} rows is not {self.views} views of each example")
        outputs = [output for _, _, output in records]
        # Scaled by the number of examples, each view's output gradient is 1/views of its own.
        output_grads = torch.autograd.grad(loss * (rows // self.views), outputs)
        if len({id(module) for module, _, _ in records}) < len(records):
            raise ValueError("a layer ran twice in one forward pass: per-sample norms need one call")
        # Under mixed precision (autocast), norms and clipping still run in the parameters' own
        # precision: a bf16 norm could understate an example's gradient and overshoot the bound.
        with torch.autocast(loss.device.type, enabled=False):
            layers = [
                _layer(module, inputs.to(_dtype(module)), grad.to(_dtype(module)), self.views)
                for (module, inputs, _), grad in zip(records, output_grads)
            ]
            norms = torch.stack([layer.squared_norms() for layer in layers]).sum(0).sqrt()
            factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            for layer in layers:
                for param, grad in layer.clipped_sums(factors):
                    param.grad = grad if param.grad is None else param.grad + grad
        return norms.detach()


class _Conv2dLayer:
    def __init__(self, module: nn.Conv2d, inputs: torch.Tensor, grad: torch.Tensor, views: int) -> None:
        self.module, self.inputs, self.grad, self.views = module, inputs, grad, views
        positions = views * grad.shape[2] * grad.shape[3]  # an example's positions, all views
        fan_in, fan_out = module.weight[0].numel(), module.out_channels
        # Ghost norm costs ~positions^2 (fan_in + fan_out); materialising ~fan_in * fan_out.
        self.ghost = positions * (fan_in + fan_out) < fan_in * fan_out
        self.per_sample: torch.Tensor | None = None if self.ghost else self._per_sample_weight_grads()

    def _backward_weight(self, grad: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor, groups: int):
        m = self.module
        return torch.ops.aten.convolution_backward(
            grad,
            inputs,
            weight,
            None,
            m.stride,
            m.padding,
            m.dilation,
            False,
            [0, 0],
            groups,
            [False, True, False],
        )[1]

    def _per_sample_weight_grads(self) -> torch.Tensor:
        """Per-example weight gradients, ``(examples, weight.numel())``: one grouped convolution
        backward, one group per example and its views as the batch (so they are summed)."""
        examples, weight = self.inputs.shape[0] // self.views, self.module.weight.detach()
        grads = self._backward_weight(
            _views_as_batch(self.grad, self.views),
            _views_as_batch(self.inputs, self.views),
            weight.repeat(examples, 1, 1, 1),
            groups=examples,
        ).view(examples, -1)
        if isinstance(self.module, WSConv2d):
            grads = _through_standardisation(grads.view(examples, weight.shape[0], -1), self.module)
        return grads.view(examples, -1)

    def squared_norms(self) -> torch.Tensor:
        views = self.views
        if self.per_sample is None:  # ghost norm
            m = self.module
            padding = cast(tuple[int, ...], m.padding)  # string padding is refused (unsupported_layers)
            unfolded = F.unfold(self.inputs, m.kernel_size, m.dilation, padding, m.stride)
            outputs = self.grad.reshape(*self.grad.shape[:2], -1)
            if isinstance(m, WSConv2d):
                norms = self._standardised_ghost_norms(m, unfolded, outputs)
            else:
                norms = _ghost_norms(unfolded, outputs, views)
        else:
            norms = self.per_sample.pow(2).sum(1)
        if self.module.bias is not None:
            norms = norms + _sum_views(self.grad.sum((2, 3)), views).pow(2).sum(1)
        return norms

    def _standardised_ghost_norms(
        self, module: WSConv2d, unfolded: torch.Tensor, outputs: torch.Tensor
    ) -> torch.Tensor:
        """``|J g_i|^2`` without materialising ``g_i``. ``J = (I - 1 1^T / N - w_hat w_hat^T / N)
        / sigma`` per output channel (``N`` its fan-in) is symmetric, and ``1`` is orthogonal
        to ``w_hat``, so ``|J g|^2 = (|g|^2 - (1.g)^2 / N - (2 - r) (w_hat.g)^2 / N) / sigma^2``
        with ``r = |w_hat|^2 / N``: a ghost norm of the output gradients over ``sigma``, less
        two projections that are sums over positions (of the output gradient times the
        unfolded input's sum, and times the layer's response ``w_hat . input``)."""
        standardised, std = _standardisation(module)
        along_ones = _sum_views((outputs * unfolded.sum(1, keepdim=True)).sum(2), self.views)
        kernel = standardised.view_as(module.weight)
        responses = F.conv2d(self.inputs, kernel, None, module.stride, module.padding, module.dilation)
        along_weight = _sum_views((outputs * responses.flatten(2)).sum(2), self.views)
        fan_in, ratio = standardised.shape[1], standardised.pow(2).mean(1)
        projected = (along_ones.pow(2) + (2 - ratio) * along_weight.pow(2)) / (fan_in * std.view(-1).pow(2))
        ghost = _ghost_norms(unfolded, outputs / std.view(1, -1, 1), self.views)
        return (ghost - projected.sum(1)).clamp(min=0)

    def clipped_sums(self, factors: torch.Tensor):
        weight = self.module.weight
        if self.per_sample is None:  # ghost norm
            scaled = self.grad * factors.repeat_interleave(self.views).view(-1, 1, 1, 1)
            summed = self._backward_weight(scaled, self.inputs, weight.detach(), groups=1)
            if isinstance(self.module, WSConv2d):
                summed = _through_standardisation(summed.view(1, weight.shape[0], -1), self.module)
            yield weight, summed.view_as(weight)
        else:
            yield weight, (factors @ self.per_sample).view_as(weight)
        if self.module.bias is not None:
            yield self.module.bias, factors @ _sum_views(self.grad.sum((2, 3)), self.views)


class _LinearLayer:
    def __init__(self, module: nn.Linear, inputs: torch.Tensor, grad: torch.Tensor, views: int) -> None:
        self.module = module
        examples = inputs.shape[0] // views
        # An example's views are consecutive rows: their positions, concatenated.
        self.inputs = inputs.reshape(examples, -1, inputs.shape[-1])
        self.grad = grad.reshape(examples, -1, grad.shape[-1])
        self.per_sample = torch.einsum("nto,ntp->nop", self.grad, self.inputs).reshape(examples, -1)
        self.bias_grads = self.grad.sum(1)

    def squared_norms(self) -> torch.Tensor:
        norms = self.per_sample.pow(2).sum(1)
        return norms + self.bias_grads.pow(2).sum(1) if self.module.bias is not None else norms

    def clipped_sums(self, factors: torch.Tensor):
        yield self.module.weight, (factors @ self.per_sample).view_as(self.module.weight)
        if self.module.bias is not None:
            yield self.module.bias, factors @ self.bias_grads


class _GroupNormLayer:
    def __init__(self, module: nn.GroupNorm, inputs: torch.Tensor, grad: torch.Tensor, views: int) -> None:
        self.module = module
        normalised = F.group_norm(inputs, module.num_groups, eps=module.eps)
        dims = tuple(range(2, grad.dim()))
        self.weight_grads = _sum_views((grad * normalised).sum(dims), views)
        self.bias_grads = _sum_views(grad.sum(dims), views)

    def squared_norms(self) -> torch.Tensor:
        return self.weight_grads.pow(2).sum(1) + self.bias_grads.pow(2).sum(1)

    def clipped_sums(self, factors: torch.Tensor):
        yield self.module.weight, factors @ self.weight_grads
        yield self.module.bias, factors @ self.bias_grads


def _sum_views(per_view: torch.Tensor, views: int) -> torch.Tensor:
    """Per-example sums of per-view rows (each example's ``views`` rows consecutive)."""
    return per_view if views == 1 else per_view.view(-1, views, *per_view.shape[1:]).sum(1)


def _views_as_batch(rows: torch.Tensor, views: int) -> torch.Tensor:
    """``(examples x views, C, H, W)`` as ``(views, examples x C, H, W)``: every example's
    channels side by side (a convolution group each), its views along the batch."""
    stacked = rows.reshape(-1, views, *rows.shape[1:]).transpose(0, 1)
    return stacked.reshape(views, -1, *rows.shape[2:])


def _concat_positions(per_view: torch.Tensor, views: int) -> torch.Tensor:
    """``(examples x views, D, P)`` as ``(examples, D, views x P)``: an example's views' positions."""
    if views == 1:
        return per_view
    examples, features, positions = per_view.shape[0] // views, per_view.shape[1], per_view.shape[2]
    return per_view.view(examples, views, features, positions).transpose(1, 2).reshape(examples, features, -1)


def _ghost_norms(unfolded: torch.Tensor, outputs: torch.Tensor, views: int) -> torch.Tensor:
    """``|g_i|^2 = <A_i^T A_i, B_i^T B_i>`` of each example's unfolded inputs ``A_i`` and
    output gradients ``B_i`` (rows ``(examples x views, D, P)``, an example's views' positions
    concatenated)."""
    unfolded, outputs = _concat_positions(unfolded, views), _concat_positions(outputs, views)
    gram_in = unfolded.transpose(1, 2) @ unfolded
    gram_out = outputs.transpose(1, 2) @ outputs
    return (gram_in * gram_out).sum((1, 2))


def _standardisation(module: WSConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The standardised kernel ``w_hat``, ``(out_channels, fan_in)``, and ``sigma``, ``(out_channels, 1)``."""
    weight = module.weight.detach().flatten(1)
    var, mean = torch.var_mean(weight, dim=1, keepdim=True, unbiased=False)
    std = torch.sqrt(var + module.eps)
    return (weight - mean) / std, std


def _through_standardisation(grads: torch.Tensor, module: WSConv2d) -> torch.Tensor:
    """Gradients ``(n, out_channels, fan_in)`` with respect to the standardised kernel
    ``w_hat``, mapped to the raw weight: per output channel,
    ``(g - mean(g) - w_hat * mean(g * w_hat)) / sqrt(var(w) + eps)``."""
    standardised, std = _standardisation(module)
    centred = grads - grads.mean(2, keepdim=True)
    return (centred - standardised * (grads * standardised).mean(2, keepdim=True)) / std


def _dtype(module: nn.Module) -> torch.dtype:
    """The precision of a recorded layer's parameters."""
    return next(module.parameters()).dtype


def _layer(module: nn.Module, inputs: torch.Tensor, grad: torch.Tensor, views: int):
    if isinstance(module, nn.Conv2d):
        return _Conv2dLayer(module, inputs, grad, views)
    if isinstance(module, nn.Linear):
        return _LinearLayer(module, inputs, grad, views)
    # Only SUPPORTED layers are recorded.
    return _GroupNormLayer(cast(nn.GroupNorm, module), inputs, grad, views)
