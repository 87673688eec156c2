"""Bounds for comparing floating-point results, derived from what is compared -- never tuned on one CPU.

Two correct implementations of one float32 computation (PyTorch's oneDNN kernels with AVX2, AVX-512 or AMX,
ONNX Runtime's MLAS, OpenVINO) differ only by rounding: in the order and blocking of their sums, in fused
multiply-adds, in folding BatchNorm into the convolution weights. The bounds here follow that from the
quantities themselves:

- one sum of ``n`` terms, evaluated in any order: the probabilistic bound of Higham & Mary ("A new approach
  to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019, Theorem 2.4 and 3.1):
  ``|computed - exact| <= gamma(n) * sum |terms|`` with ``gamma(n) = exp(LAMBDA sqrt(n) u + n u^2 / (1 - u)) - 1``,
  for independent, mean-zero rounding errors, failing with probability at most ``2 n exp(-LAMBDA^2 (1-u)^2 / 2)``
  (LAMBDA = 7: below 1e-6 for a sum of 20,000 terms). Two implementations each obey it: twice that apart.
- a whole network (:func:`network_logit_bound`): every rounding error of every sum in it, carried to the logit
  to first order by the gradient, and added up with the same concentration (Hoeffding) argument, per image.
- a probability computed from a logit: the calibrated sigmoid's slope (:func:`probability_bound`).

Results computed in float64 by one formula on both sides (metrics, AUC, calibration) are compared at 1e-12:
what differs there is the order of a few float64 operations (u = 1.1e-16) over at most thousands of terms.
"""

from __future__ import annotations

import math

import numpy as np

#: unit roundoff (half the machine epsilon) of float32 and of bfloat16 (8 significant bits)
U32 = float(np.finfo(np.float32).eps) / 2
U_BF16 = 2.0 ** -8
#: the concentration parameter of every probabilistic bound here (see the module docstring)
LAMBDA = 7.0
#: exact arithmetic done twice: float64 results of one formula (u = 1.1e-16, thousands of terms at most)
FLOAT64_SAME_FORMULA = 1e-12


def gamma(n: int, u: float = U32, lam: float = LAMBDA) -> float:
    """Higham & Mary's probabilistic gamma~_n(lambda): relative error bound of a sum of ``n`` terms."""
    return math.expm1(lam * math.sqrt(n) * u + n * u * u / (1 - u))


def sum_bound(abs_sum, n: int, u: float = U32):
    """|a - b| for two evaluations, in any order, of one sum of ``n`` terms whose magnitudes add up to
    ``abs_sum`` (a number or an array of them)."""
    return 2 * gamma(n, u) * abs_sum


def float32_values_bound(values) -> np.ndarray:
    """The rounding of a value to float32 on its way out (e.g. a served FP32 tensor): u |value|."""
    return U32 * np.abs(np.asarray(values, dtype=np.float64))


def probability_bound(probabilities, logit_bound, temperature: float):
    """|p_a - p_b| for p = sigmoid(logit / T + b) when the logits are at most ``logit_bound`` apart.

    The slope of the sigmoid is p (1 - p) <= 1/4; over the interval the logit may move in, its largest value
    is taken at the point nearest to p = 1/2. Plus the float32 rounding of the served probability."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-300, 1 - 1e-16)
    z = np.log(p) - np.log1p(-p)
    dz = np.asarray(logit_bound, dtype=np.float64) / temperature
    nearest = np.where(np.abs(z) <= dz, 0.0, np.abs(z) - dz)
    slope = 1.0 / (2.0 + 2.0 * np.cosh(nearest))  # sigmoid'(z) = 1 / (2 + 2 cosh z)
    return slope * dz + 2 * float32_values_bound(p) + 1e-300


def network_logit_bound(net, x, u: float = U32, lam: float = LAMBDA, output: str = "logit") -> np.ndarray:
    """Per image: how far two correct float32 implementations of ``net`` (PyTorch, ONNX Runtime, OpenVINO,
    on any kernel path) may put its logit apart, for the input batch ``x`` [N,1,S,S]. ``net`` is the plain
    network or its :class:`model.network.LogitAndCam`; with ``output="cam"`` the bound is per CAM element
    ([N, h*w], LogitAndCam only).

    First-order forward error analysis: each output element ``y_i`` of a convolution or linear layer (fan-in
    K: K products and K-1 additions, plus the bias, a folded BatchNorm and the residual add downstream) is off
    by a sum of at most K + 3 rounding errors, each at most ``u`` times a partial sum, so at most ``u`` times
    ``m_i = (|W| * |a|)_i + |b|``. The logit moves by ``g_i`` (its gradient w.r.t. ``y_i``) per unit of
    error. With independent, mean-zero rounding errors (as in Higham & Mary's model), Hoeffding's inequality
    over all of them bounds the logit's error of one implementation by ``lam * u * sqrt(V)``,
    ``V = sum_i (K_i + 3) (g_i m_i)^2``; BatchNorm, pooling, the residual sums and the CAM's mean add their
    own terms the same way. Two implementations round independently: their difference is within
    ``lam * u * sqrt(2 V)``, failing with probability at most ``2 exp(-lam^2 / 2)`` (2e-11). It holds for
    ANY order of every sum, so it is pessimistic: about 1 % of a ResNet-50's logit, a few hundred times what
    one CPU shows, yet far below what the bugs it guards against move (a wrong normalisation, graph, weight
    or layout). The bound itself needs one significant digit only, so it is computed in float32 (a forward
    pass with |W| * |a| beside each layer, one backward pass per output element).
    """
    import torch
    from torch import nn
    from torchvision.models.resnet import Bottleneck

    terms: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (layer output, m, number of roundings)

    def record(module, inputs, out):
        a = inputs[0]
        if isinstance(module, nn.Conv2d):
            m = nn.functional.conv2d(a.abs(), module.weight.abs(), None, module.stride, module.padding,
                                     module.dilation, module.groups)
            n = module.weight[0].numel() + 3
        elif isinstance(module, nn.Linear):
            m, n = nn.functional.linear(a.abs(), module.weight.abs()), module.in_features + 3
        elif isinstance(module, nn.BatchNorm2d):  # (x - mean) * scale + shift: three roundings
            scale = module.weight / torch.sqrt(module.running_var + module.eps)
            shape = (1, -1, 1, 1)
            m = ((a - module.running_mean.reshape(shape)).abs() * scale.abs().reshape(shape)
                 + module.bias.abs().reshape(shape))
            n = 3
        elif isinstance(module, nn.AdaptiveAvgPool2d):  # a mean of h*w values
            m, n = nn.functional.adaptive_avg_pool2d(a.abs(), module.output_size), a.shape[-1] * a.shape[-2]
        else:  # a residual block's sum: one rounding of what comes out (before its ReLU: the same where > 0)
            m, n = out.abs(), 1
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            m = m + module.bias.abs().reshape((1, -1) + (1,) * (m.dim() - 2))
        out.retain_grad()
        terms.append((out, m.detach(), n))

    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.AdaptiveAvgPool2d, Bottleneck)
    handles = [module.register_forward_hook(record) for module in net.modules() if isinstance(module, kinds)]
    was_training = net.training
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    variances = []
    try:
        net.eval()
        with torch.enable_grad():
            out = net(x)
            if output == "cam":
                selected = out[1].reshape(len(x), -1)
            else:
                selected = (out[0] if isinstance(out, tuple) else out).reshape(len(x), 1)
            for j in range(selected.shape[1]):
                for t, _, _ in terms:
                    t.grad = None
                # images do not interact in eval mode: each gets its own gradient
                selected[:, j].sum().backward(retain_graph=j + 1 < selected.shape[1])
                variance = torch.zeros(len(x), dtype=torch.float64)
                for t, m, n in terms:
                    if t.grad is not None:  # else a layer this output does not depend on
                        variance += (t.grad * m).square_().reshape(len(x), -1).sum(dim=1, dtype=torch.float64) * n
                if output != "cam" and isinstance(out, tuple):  # LogitAndCam: logit = mean of h*w CAM values + bias
                    cam = out[1].detach()
                    head = cam.abs().reshape(len(x), -1).mean(dim=1) + abs(float(getattr(net, "bias", 0.0)))
                    variance += head.double() ** 2 * (cam[0].numel() + 1)
                variances.append(variance)
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
        net.zero_grad(set_to_none=True)
    bound = lam * u * np.sqrt(2 * torch.stack(variances, dim=1).numpy())
    return bound if output == "cam" else bound[:, 0]


def weight_gradient_bound(net, forward_backward) -> dict:
    """Per parameter element: how far two float32 evaluations of its gradient may lie apart when only the
    grouping of the reduction over the batch (and positions) differs -- e.g. one batch of 32 against two of 16
    averaged (DDP). Each weight gradient is one sum of n terms (conv: N*H*W products of an output gradient
    and an input activation; BatchNorm and linear alike); :func:`sum_bound` of their magnitudes, taken from
    the same backward pass with every operand replaced by its absolute value.

    ``forward_backward()`` runs one forward and backward pass of ``net`` (in eval mode for BatchNorm).
    Returns {parameter name: bound tensor of its shape}."""
    import torch
    from torch import nn

    inputs, grads = {}, {}

    def keep(module, args, output):
        inputs[module] = args[0].detach()
        output.register_hook(lambda g, module=module: grads.__setitem__(module, g.detach()))

    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    handles = [m.register_forward_hook(keep) for m in layers]
    try:
        forward_backward()
    finally:
        for handle in handles:
            handle.remove()
    names = {p: name for name, p in net.named_parameters()}
    bounds = {}
    with torch.no_grad():
        for m in layers:
            if m not in grads:
                continue
            a, d = inputs[m].float().abs(), grads[m].float().abs()
            if isinstance(m, nn.Conv2d):
                n = d.shape[0] * d.shape[2] * d.shape[3]
                terms = {m.weight: torch.nn.grad.conv2d_weight(a, m.weight.shape, d, m.stride, m.padding,
                                                               m.dilation, m.groups)}
                if m.bias is not None:
                    terms[m.bias] = d.sum(dim=(0, 2, 3))
            elif isinstance(m, nn.Linear):
                n = d.shape[0]
                terms = {m.weight: d.t() @ a}
                if m.bias is not None:
                    terms[m.bias] = d.sum(dim=0)
            else:  # BatchNorm in eval mode: y = (x - mean) / sqrt(var + eps) * weight + bias
                n = d.shape[0] * d.shape[2] * d.shape[3]
                shape = (1, -1, 1, 1)
                normalised = (inputs[m].float() - m.running_mean.reshape(shape)).abs() / torch.sqrt(
                    m.running_var.reshape(shape) + m.eps)
                terms = {m.weight: (d * normalised).sum(dim=(0, 2, 3)), m.bias: d.sum(dim=(0, 2, 3))}
            for parameter, abs_sum in terms.items():
                bounds[names[parameter]] = sum_bound(abs_sum.double(), n)
    return bounds


def adamw_first_step_bound(lr: float, grad_a, grad_b, weights, eps: float = 1e-8):
    """|w_a - w_b| after AdamW's first step from the same weights with gradients ``grad_a`` and ``grad_b``.

    The first step moves each weight by lr * g / (|g| + eps) (its bias-corrected moments are g and g^2), after
    the decay w (1 - lr wd), the same on both sides. So the weights differ by exactly lr |phi(g_a) - phi(g_b)|,
    phi(g) = g / (|g| + eps), plus each side's float32 rounding of a few operations on |w| and lr."""
    ga, gb = grad_a.double(), grad_b.double()
    phi = lambda g: g / (g.abs() + eps)  # noqa: E731
    return lr * (phi(ga) - phi(gb)).abs() + 8 * U32 * (weights.double().abs() + lr)


def engine_logit_bound(precision: str, gate_tolerance: float, net=None, x=None):
    """How far an engine at ``precision`` may put a logit from the fp32 reference (ONNX Runtime, or any other
    fp32 implementation): fp32 differs by float32 rounding only (:func:`network_logit_bound` of ``net`` on
    ``x``, or the gate's tolerance where no network is at hand); bf16 and int8 round on purpose, and the
    bound is the one the bundle's accuracy gate admitted the engine with (``engine_gate.max_abs_logit_diff``,
    stored at export) -- what the product promises for them."""
    if precision == "fp32" and net is not None:
        return network_logit_bound(net, x)
    return np.full(len(x) if x is not None else 1, float(gate_tolerance))


def approx64(expected):
    """pytest.approx for float64 results of one formula on both sides (see FLOAT64_SAME_FORMULA)."""
    import pytest

    return pytest.approx(expected, rel=0, abs=FLOAT64_SAME_FORMULA)


def normalize_bound(pixels, mean: float, std: float) -> np.ndarray:
    """|float32 normalisation - exact| for uint8 ``pixels``: x = p * float32(1 / (255 std)) - float32(mean / std)
    (model.preprocessing.normalize) rounds both constants, the product and the difference: at most 2u on
    each of the two terms' magnitudes (with a round margin: 3u)."""
    p = np.asarray(pixels, dtype=np.float64)
    return 3 * U32 * (p / (255 * std) + abs(mean) / std)
