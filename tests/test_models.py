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


# torchvision and timm models, adapted to kdbench's (features, logits) contract (issue 10). Five torchvision
# families and two timm ones, at CIFAR's 32x32 (digits' 8x8 is too small for ImageNet stems that downsample 32x).
ECOSYSTEM = ["tv:resnet18", "tv:mobilenet_v3_small", "tv:efficientnet_b0", "tv:regnet_y_400mf", "tv:convnext_tiny",
             "timm:resnet18", "timm:mobilenetv3_small_050"]


@pytest.mark.parametrize("name", ECOSYSTEM)
def test_library_models_give_features_and_logits_of_their_head_and_load_their_own_weights(name):
    library, _, arch = name.partition(":")
    model = build_model(name, num_classes=7, in_channels=3).eval()
    with torch.inference_mode():
        f, z = model(torch.randn(2, 3, 32, 32))
        assert f.shape == (2, model.feature_dim) and z.shape == (2, 7)
        assert torch.equal(z, model.kd_head(f))  # one forward pass: the logits are the head on these features
    # The library's own state_dict (as its users save it) loads as it is: no parameter was renamed.
    if library == "tv":
        import torchvision

        own = torchvision.models.get_model(arch, weights=None, num_classes=7)
    else:
        import timm

        own = timm.create_model(arch, pretrained=False, num_classes=7)
    assert sorted(model.state_dict()) == sorted(own.state_dict())
    model.load_state_dict(own.state_dict(), strict=True)
    own.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(model(x)[1], own(x), atol=1e-5)  # the same network, as the library computes it


def test_library_model_takes_the_data_sets_channels():
    model = build_model("tv:resnet18", num_classes=10, in_channels=1).eval()
    f, z = model(torch.randn(2, 1, 32, 32))
    assert z.shape == (2, 10) and model.conv1.in_channels == 1


@pytest.mark.parametrize("name", ECOSYSTEM)
def test_library_student_takes_a_distillation_step_with_the_geometry_term(name, synthetic):
    """distill() with the geometry method (CE + KD + geometry) on a few synthetic images: finite losses, weights move."""
    import dataclasses
    import math

    from kdbench.evaluate import forward_all
    from kdbench.geometry import class_centroids
    from kdbench.train import METHODS, Recipe, Teacher, TrainConfig, distill

    data = synthetic
    data = dataclasses.replace(data, train_x=data.train_x[:64], train_y=data.train_y[:64], val_x=data.val_x[:32],
                               val_y=data.val_y[:32], test_x=data.test_x[:32], test_y=data.test_y[:32])
    teacher = build_model("cnn_student", data.num_classes, 3).eval().requires_grad_(False)
    feats, _ = forward_all(teacher, data.train_x, data)
    t = Teacher(teacher, class_centroids(feats, data.train_y, data.num_classes), {"arch": "cnn_student"})
    res = distill(TrainConfig(name, METHODS["geometry"], Recipe(epochs=1, batch_size=32), seed=0), data, t)
    assert all(math.isfinite(res[f"loss_{term}"]) for term in ("ce", "kd", "geometry")), res
    assert res["loss_geometry"] > 0 and -1 <= res["test_geom_corr"] <= 1


def test_bad_library_names_say_what_is_allowed():
    from kdbench.models import check_model

    for name, fragment in (("tv:resnet9000", "torchvision has no classification model 'resnet9000'"),
                           ("timm:nonexistent_net", "timm has no model"), ("keras:resnet", "unknown library"),
                           ("vgg", "tv:NAME")):
        with pytest.raises(ValueError, match=fragment):
            check_model(name)
