"""The ONNX Q/DQ scheme simulated in torch: fake quantization on chosen Linear/Conv layers.

Mirrors what `quantize_static` writes for the static recipes, so decisions made here (sensitivity
ranking, SmoothQuant alpha, QAT weights) carry over: weights symmetric int8 per output channel,
scale = max|w| / 127 per channel; activations (a layer's input) symmetric int8 per tensor, scale =
amax / 127 from a calibration table; integer range [-127, 127] (ONNX Runtime's symmetric int8, the
range TensorRT uses). torch's own fake-quant ops do the rounding (half to even, as ONNX Runtime)
and give straight-through gradients, so the same object drives quantization-aware training.

Weights are fake-quantized through `torch.nn.utils.parametrize` (the trained tensor stays the
float original), activations through forward pre-hooks; `remove()` restores the plain model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

QMAX = 127  # symmetric int8: [-127, 127]
QUANTIZABLE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel (axis 0) symmetric int8 fake quantization, straight-through gradient."""
    amax = w.detach().abs().flatten(1).amax(1).clamp_min(1e-12)
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, (amax / QMAX).float(), zero, 0, -QMAX, QMAX)


class _WeightFakeQuant(nn.Module):
    def __init__(self, sim: QuantSim, name: str):
        super().__init__()
        self._sim, self._name = [sim], name  # list: not a registered submodule

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(w) if self._name in self._sim[0].weights else w


class QuantSim:
    """Fake-quantizes named Linear/Conv modules of `model` in place until `remove()`.

    `act_amax` maps a layer name to the calibrated |max| of its input. `weights` / `activations`
    are the sets of layer names currently quantized; change them freely between forward passes.
    With `learn_scales=True` the activation scales are parameters (LSQ, torch's learnable
    fake-quant op) for quantization-aware training.
    """

    def __init__(self, model: nn.Module, act_amax: dict[str, float], learn_scales: bool = False):
        modules = dict(model.named_modules())
        missing = sorted(n for n in act_amax if not isinstance(modules.get(n), QUANTIZABLE_MODULES))
        if missing:
            raise KeyError(f"not Linear/Conv modules of the model: {', '.join(missing)}")
        self.model = model
        self.names = list(act_amax)
        self.weights: set[str] = set()
        self.activations: set[str] = set()
        self.learn_scales = learn_scales
        self.scales = nn.ParameterDict(
            {n.replace(".", "/"): nn.Parameter(torch.tensor(max(a, 1e-12) / QMAX), requires_grad=learn_scales)
             for n, a in act_amax.items()}
        )
        self._handles = []
        for name in self.names:
            module = modules[name]
            parametrize.register_parametrization(module, "weight", _WeightFakeQuant(self, name), unsafe=True)
            self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))

    def scale(self, name: str) -> nn.Parameter:
        return self.scales[name.replace(".", "/")]

    def _input_hook(self, name: str):
        def hook(module, args):
            if name not in self.activations:
                return None
            x, *rest = args
            s = self.scale(name)
            if self.learn_scales:
                zero = torch.zeros(1, device=x.device)
                q = torch._fake_quantize_learnable_per_tensor_affine(x, s.reshape(1), zero, -QMAX, QMAX, 1.0)
            else:
                q = torch.fake_quantize_per_tensor_affine(x, float(s), 0, -QMAX, QMAX)
            return (q, *rest)

        return hook

    def set(self, weights=(), activations=()) -> QuantSim:
        self.weights, self.activations = set(weights), set(activations)
        return self

    def quantize_all(self, except_layers=()) -> QuantSim:
        keep = set(except_layers)
        return self.set([n for n in self.names if n not in keep], [n for n in self.names if n not in keep])

    def act_amax(self) -> dict[str, float]:
        return {n: float(self.scale(n).detach().abs()) * QMAX for n in self.names}

    def remove(self) -> None:
        """Back to the plain float model (trained weights kept, fake quantization gone)."""
        modules = dict(self.model.named_modules())
        for h in self._handles:
            h.remove()
        for name in self.names:
            parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=False)
        self._handles = []


def run_with_input_hooks(model: nn.Module, names, x, batch_size: int, on_input) -> None:
    """Run `model` over images `x` in batches, calling `on_input(name, tensor)` with each named
    module's input (forward pre-hooks, removed afterwards)."""
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_pre_hook(lambda module, args, n=n: on_input(n, args[0].detach())) for n in names
    ]
    try:
        for i in range(0, len(x), batch_size):
            model(torch.as_tensor(x[i : i + batch_size]))
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def input_amax(model: nn.Module, names, x, batch_size: int = 128, per_channel: bool = False) -> dict:
    """|max| of each named module's input over images `x` (N, C, H, W): a float per layer, or a
    (channels,) tensor over the last dimension with `per_channel` (SmoothQuant's statistic)."""
    out: dict = {}

    def update(name, a):
        a = a.abs()
        a = a.reshape(-1, a.shape[-1]).amax(0) if per_channel else a.amax()
        out[name] = a if name not in out else torch.maximum(out[name], a)

    run_with_input_hooks(model, names, x, batch_size, update)
    return out if per_channel else {n: float(v) for n, v in out.items()}


def quantizable_modules(model: nn.Module) -> list[str]:
    """Qualified names of the model's Linear/Conv modules that its forward calls, in registration order: what a
    hook on a module's input sees. `nn.MultiheadAttention` never calls its `out_proj` (it hands the weight to
    `F.multi_head_attention_forward`), so that one is left to ONNX Runtime."""
    uncalled = {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE_MODULES) and n not in uncalled]
