"""Model construction and the paper's model-size column."""

import pytest
import torch

from bso.models import VGG11, SpikingVGG, model_size, parse_layers


@pytest.mark.parametrize(
    "classes,size_mb,fp_mb,other",
    [(10, 1.20, 36.91, 12_426), (100, 1.39, 37.10, 58_596)],
)
def test_vgg11_size_matches_the_paper(classes, size_mb, fp_mb, other):
    size = model_size(SpikingVGG(VGG11, in_channels=3, num_classes=classes))
    assert size.binary_params == 9_216_000
    # other = first conv 1,728 + bias 64, BN 2 x 2,752, FC 512 x classes + classes
    assert size.full_precision_params == other
    assert round(size.size_mb, 2) == size_mb
    assert round(size.full_precision_size_mb, 2) == fp_mb


def test_full_precision_vgg_has_no_binary_weights():
    size = model_size(SpikingVGG(VGG11, num_classes=10, weights="full"))
    assert size.binary_params == 0
    assert round(size.size_mb, 2) == 36.91


def test_layer_list_parsing_and_errors():
    assert parse_layers("64C3-AP2-128C5-MP2") == [
        ("conv", 64, 3),
        ("AP", 2, 2),
        ("conv", 128, 5),
        ("MP", 2, 2),
    ]
    assert parse_layers(["8C3", "AP2"]) == [("conv", 8, 3), ("AP", 2, 2)]
    with pytest.raises(ValueError, match="64X3"):
        parse_layers("64X3")
    with pytest.raises(ValueError, match="start with a conv"):
        parse_layers("AP2-64C3")


def test_vgg11_forward_shape_on_cifar_sized_input():
    model = SpikingVGG(VGG11, in_channels=3, num_classes=100)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
