import pytest
import torch

from kdbench.models import MODELS, build_model

WIDTHS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet8x4": 256, "resnet32x4": 256,
          "cnn_teacher": 128, "cnn_student": 16}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_returns_pooled_features_and_logits(name):
    channels, size = (1, 8) if name.startswith("cnn") else (3, 32)
    model = build_model(name, num_classes=7, in_channels=channels).eval()
    with torch.inference_mode():
        f, z = model(torch.randn(2, channels, size, size))
        head = model.fc(f)
    assert f.shape == (2, model.feature_dim) and z.shape == (2, 7)
    assert model.feature_dim == WIDTHS[name]
    # The logits are the linear head applied to the returned features.
    assert torch.allclose(head, z, atol=1e-5)


def test_unknown_model_names_the_registry():
    with pytest.raises(ValueError, match="resnet18"):
        build_model("vgg", 10, 3)
