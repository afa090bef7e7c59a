from bso.models.mlp import SpikingMLP
from bso.models.resnet import BiRealResNet18, SpikingResNet19
from bso.models.size import ModelSize, model_size
from bso.models.vgg import VGG11, SpikingVGG, parse_layers

__all__ = [
    "VGG11",
    "BiRealResNet18",
    "ModelSize",
    "SpikingMLP",
    "SpikingResNet19",
    "SpikingVGG",
    "model_size",
    "parse_layers",
]
