from bso.models.size import ModelSize, model_size
from bso.models.vgg import VGG11, SpikingVGG, parse_layers

__all__ = ["VGG11", "ModelSize", "SpikingVGG", "model_size", "parse_layers"]
