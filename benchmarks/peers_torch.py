"""The PyTorch side of `benchmarks/peers.py` (imported only with torch).

`from_keras(model)` rebuilds the zoo's SimpleCNN or CIFAR ResNet as a torch
module with the Keras weights (NCHW layout; Keras' "same" padding, which
pads a stride-2 convolution only after, is reproduced exactly; Flatten
follows Keras' height-width-channel order). `peers(module, x, y, k)` gives
the timed calls of the peers on one batch.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _conv(layer) -> nn.Conv2d:
    kernel = layer.kernel.numpy()  # (kh, kw, in, out)
    conv = nn.Conv2d(
        kernel.shape[2],
        kernel.shape[3],
        kernel.shape[:2],
        stride=layer.strides,
        padding=0,
        bias=layer.use_bias,
    )
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1)))
        if layer.use_bias:
            conv.bias.copy_(torch.from_numpy(layer.bias.numpy()))
    return conv


class SamePadConv(nn.Sequential):
    """A Keras Conv2D: "same" pads (total - total // 2) after, like TF.

    The padding is fixed from the layer's input size, so the module has
    no shape-dependent control flow (BackPACK's converter traces it).
    """

    def __init__(self, layer):
        modules = []
        if layer.padding == "same":
            size, kernel = layer.input.shape[1], layer.kernel.shape[0]
            stride = layer.strides[0]
            out = -(-size // stride)
            total = max((out - 1) * stride + kernel - size, 0)
            before, after = total // 2, total - total // 2
            modules.append(nn.ZeroPad2d((before, after, before, after)))
        super().__init__(*modules, _conv(layer))


def _batch_norm(layer) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(layer.gamma.shape[0], eps=layer.epsilon)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(layer.gamma.numpy()))
        bn.bias.copy_(torch.from_numpy(layer.beta.numpy()))
        bn.running_mean.copy_(torch.from_numpy(layer.moving_mean.numpy()))
        bn.running_var.copy_(torch.from_numpy(layer.moving_variance.numpy()))
    return bn


def _dense(layer) -> nn.Linear:
    kernel = layer.kernel.numpy()
    linear = nn.Linear(*kernel.shape)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
        linear.bias.copy_(torch.from_numpy(layer.bias.numpy()))
    return linear


class FlattenNHWC(nn.Module):
    """Keras' Flatten of a channels-last image, on an NCHW tensor."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1).flatten(1)


def _simple_cnn(model) -> nn.Sequential:
    layers = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Conv2D":
            layers.append(SamePadConv(layer))
        elif kind == "BatchNormalization":
            layers.append(_batch_norm(layer))
        elif kind == "ReLU":
            layers.append(nn.ReLU())
        elif kind == "MaxPooling2D":
            layers.append(nn.MaxPool2d(layer.pool_size))
        elif kind == "Flatten":
            layers.append(FlattenNHWC())
        elif kind == "Dense":
            layers.append(_dense(layer))
            if layer.activation.__name__ == "relu":
                layers.append(nn.ReLU())
        elif kind not in ("InputLayer", "Dropout"):
            raise ValueError(f"no torch twin for {kind} {layer.name}")
    return nn.Sequential(*layers)


class ZeroPadShortcut(nn.Module):
    """He et al.'s option A: subsample, zero-pad channels (both sides)."""

    def __init__(self, layer):
        super().__init__()
        self.stride = layer.stride
        extra = layer.filters - layer.input.shape[-1]
        self.pad = (0, 0, 0, 0, extra // 2, extra - extra // 2)

    def forward(self, x):
        return F.pad(x[:, :, :: self.stride, :: self.stride], self.pad)


class BasicBlock(nn.Module):
    def __init__(self, model, name: str):
        super().__init__()
        get = model.get_layer
        self.conv1 = SamePadConv(get(f"{name}_conv1"))
        self.bn1 = _batch_norm(get(f"{name}_bn1"))
        self.conv2 = SamePadConv(get(f"{name}_conv2"))
        self.bn2 = _batch_norm(get(f"{name}_bn2"))
        names = {layer.name for layer in model.layers}
        self.shortcut = nn.Identity()
        if f"{name}_shortcut" in names:
            self.shortcut = ZeroPadShortcut(get(f"{name}_shortcut"))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(self.shortcut(x) + y)


class CifarResNet(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.stem = SamePadConv(model.get_layer("stem_conv"))
        self.stem_bn = _batch_norm(model.get_layer("stem_bn"))
        blocks = sorted(
            {
                layer.name.rsplit("_", 1)[0]
                for layer in model.layers
                if layer.name.startswith("stage") and "_conv" in layer.name
            },
            key=lambda n: (int(n[5]), int(n.split("_")[1])),
        )
        self.blocks = nn.Sequential(*(BasicBlock(model, b) for b in blocks))
        self.logits = _dense(model.get_layer("logits"))

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        return self.logits(x.mean(dim=(2, 3)))


def from_keras(model) -> nn.Module:
    """A torch twin of a zoo SimpleCNN or CifarResNet, in eval mode."""
    names = {layer.name for layer in model.layers}
    twin = CifarResNet(model) if "stem_conv" in names else _simple_cnn(model)
    return twin.eval()


def _rows_gram(rows: torch.Tensor) -> np.ndarray:
    rows = rows.double()
    return (rows @ rows.T).numpy()


def peers(module: nn.Module, x, y, iterations: int) -> dict:
    """`{name: call}` of the peers on the batch `(x, y)`."""
    from pyhessian import hessian

    params = [p for p in module.parameters() if p.requires_grad]
    criterion = nn.CrossEntropyLoss()

    def gradient():
        loss = criterion(module(x), y)
        return torch.autograd.grad(loss, params)

    vector = [torch.randn_like(p) for p in params]
    loss = criterion(module(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def hvp():
        # PyHessian's Hessian-vector product: a backward pass of g.v
        # through the retained graph of the gradient.
        return torch.autograd.grad(
            grads, params, grad_outputs=vector, retain_graph=True
        )

    pyhessian = hessian(module, criterion, data=(x, y), cuda=False)
    calls = {
        "torch/gradient": gradient,
        "pyhessian/hvp": hvp,
        "pyhessian/top_fixed": lambda: float(
            pyhessian.eigenvalues(maxIter=iterations, tol=0.0)[0][0]
        ),
        "pyhessian/top": lambda: float(pyhessian.eigenvalues()[0][0]),
        "torch.func/gram": lambda: _func_gram(module, x, y),
        "backpack/gram": _backpack_gram(module, x, y),
    }
    return calls


def _func_gram(module: nn.Module, x, y) -> np.ndarray:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v.detach() for k, v in module.named_buffers()}

    def loss(p, xi, yi):
        out = functional_call(module, (p, buffers), (xi[None],))
        return F.cross_entropy(out, yi[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    rows = torch.cat([g.flatten(1) for g in per_example.values()], dim=1)
    return _rows_gram(rows)


def _backpack_gram(module: nn.Module, x, y):
    """BackPACK's BatchGrad Gram, or a call raising why it cannot run."""
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    try:
        converter = not isinstance(module, nn.Sequential)  # residual nets
        extended = extend(copy.deepcopy(module), use_converter=converter)
    except Exception as error:  # noqa: BLE001 - reported by the caller
        failure = error

        def unsupported():
            raise failure

        return unsupported
    loss_fn = extend(nn.CrossEntropyLoss())

    def gram():
        extended.zero_grad()
        loss = loss_fn(extended(x), y)
        with backpack(BatchGrad()):
            loss.backward()
        rows = torch.cat(
            [p.grad_batch.flatten(1) for p in extended.parameters()], dim=1
        )
        return _rows_gram(rows * x.shape[0])  # mean loss: grad_batch / N

    return gram
