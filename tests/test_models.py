import pytest
import torch

from kdbench.models import ALIASES, MODELS, build_model, count_parameters

# Facts of RepDistiller's CIFAR zoo (100 classes, 3x32x32): parameters (millions, 2 decimals), state_dict entries,
# and the (C, H) of the stem and every stage map, then the pooled feature width. Counted from its model code
# (benchmarks/zoo.py loads its checkpoints into these models and compares their outputs).
_R = [(16, 32), (16, 32), (32, 16), (64, 8)]
_X4 = [(32, 32), (64, 32), (128, 16), (256, 8)]
_V2 = [(64, 32), (64, 32), (128, 16), (256, 8), (512, 4)]
_VGG = [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)]
_W = lambda k: [(16, 32), (16 * k, 32), (32 * k, 16), (64 * k, 8)]
ZOO = {"resnet8": (0.08, 56, _R, 64), "resnet14": (0.18, 92, _R, 64), "resnet20": (0.28, 128, _R, 64),
       "resnet32": (0.47, 200, _R, 64), "resnet44": (0.67, 272, _R, 64), "resnet56": (0.86, 344, _R, 64),
       "resnet110": (1.74, 668, _R, 64), "resnet8x4": (1.23, 62, _X4, 256), "resnet32x4": (7.43, 206, _X4, 256),
       "wrn_16_1": (0.18, 82, _W(1), 64), "wrn_16_2": (0.70, 83, _W(2), 128), "wrn_40_1": (0.57, 226, _W(1), 64),
       "wrn_40_2": (2.26, 227, _W(2), 128), "vgg8": (3.97, 37, _VGG, 512), "vgg11": (9.28, 58, _VGG, 512),
       "vgg13": (9.46, 72, _VGG, 512), "vgg16": (14.77, 93, _VGG, 512), "vgg19": (20.09, 114, _VGG, 512),
       "MobileNetV2": (0.81, 320, [(16, 16), (12, 16), (16, 8), (48, 4), (160, 2)], 1280),
       "ShuffleV1": (0.95, 296, [(24, 32), (240, 16), (480, 8), (960, 4)], 960),
       "ShuffleV2": (1.36, 338, [(24, 32), (116, 16), (232, 8), (464, 4)], 1024),
       "ResNet18": (11.22, 122, _V2, 512), "ResNet34": (21.33, 218, _V2, 512),
       "ResNet50": (23.71, 320, [(64, 32), (256, 32), (512, 16), (1024, 8), (2048, 4)], 2048)}
DIGITS = {"cnn_teacher": [(64, 8), (64, 8), (128, 4)], "cnn_student": [(8, 8), (8, 8), (16, 4)]}
# mdistiller's ImageNet MobileNetV1 (1000 classes, 3x224x224): the same facts (benchmarks/zoo.py --mdistiller).
IMAGENET = {"MobileNetV1": (4.23, 164, [(128, 56), (256, 28), (512, 14), (1024, 7)], 1024)}


def test_the_registry_is_repdistillers_zoo_mdistillers_imagenet_student_and_the_digits_cnns():
    assert set(MODELS) == set(ZOO) | set(IMAGENET) | set(DIGITS)
    assert all(MODELS[ALIASES[a]] is MODELS[n] for a, n in (("resnet18", "ResNet18"), ("resnet50", "ResNet50")))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_matches_repdistillers_counts_and_shapes(name):
    params, entries, maps, width = ZOO[name]
    model = build_model(name, num_classes=100, in_channels=3).eval()
    assert round(count_parameters(model) / 1e6, 2) == params and len(model.state_dict()) == entries
    with torch.inference_mode():
        s = model.forward_stages(torch.randn(2, 3, 32, 32))
    assert [(m.shape[1], m.shape[2]) for m in s.maps] == maps and all(m.shape[2] == m.shape[3] for m in s.maps)
    assert [p.shape for p in s.preact] == [m.shape for m in s.maps]
    assert s.features.shape == (2, width) == (2, model.feature_dim)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_returns_pooled_features_of_its_last_map_and_logits_of_its_head(name):
    channels, size = (1, 8) if name.startswith("cnn") else (3, 32)
    model = build_model(name, num_classes=7, in_channels=channels).eval()
    x = torch.randn(2, channels, size, size)
    with torch.inference_mode():
        f, z = model(x)
        s = model.forward_stages(x)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert f.shape == (2, model.feature_dim) and z.shape == (2, 7)
    assert torch.equal(f, s.features) and torch.equal(z, s.logits)  # forward is forward_stages without the maps
    with torch.inference_mode():
        assert torch.allclose(head(s.features), s.logits, atol=1e-6)  # the logits are the linear head on the features
    if name.startswith("cnn"):
        assert [(m.shape[1], m.shape[2]) for m in s.maps] == DIGITS[name]
    # The pooled features are the mean of the last map, after the ReLU (and, for nets with a last 1x1 conv
    # or BN after the last stage — WRN, MobileNetV2, ShuffleV2 — of that layer's output, not the stage map).
    if name not in ("MobileNetV2", "ShuffleV2") and not name.startswith("wrn"):
        assert torch.allclose(s.maps[-1].mean((2, 3)), s.features, atol=1e-5)
    if name.startswith("wrn"):  # WRN: BN-ReLU of the last stage (its pre-activation), then the pool
        assert torch.allclose(torch.relu(s.preact[-1]).mean((2, 3)), s.features, atol=1e-5)


def test_mobilenet_v1_has_mdistillers_counts_names_and_stages():
    params, entries, maps, width = IMAGENET["MobileNetV1"]
    model = build_model("MobileNetV1", 1000, 3).eval()
    assert round(count_parameters(model) / 1e6, 2) == params and len(model.state_dict()) == entries
    assert {"model.0.0.weight", "model.13.3.weight", "model.13.4.running_var", "fc.weight"} <= set(model.state_dict())
    with torch.inference_mode():
        s = model.forward_stages(torch.randn(1, 3, 224, 224))
    assert [(m.shape[1], m.shape[2]) for m in s.maps] == maps and s.features.shape == (1, width)
    assert all(torch.equal(torch.relu(p), m) for p, m in zip(s.preact, s.maps)) and (s.preact[-1] < 0).any()
    assert [b.num_features for b in model.bn_before_relu()] == [c for c, _ in maps]


@pytest.mark.parametrize("name", ["tv:resnet18", "tv:resnet50"])
def test_torchvision_resnets_give_mdistillers_pre_activations_and_their_bns(name):
    """Each stage's map is its pre-activation after the ReLU (the stem: the same tensor, as mdistiller returns
    it); the pass gives the library forward's own logits; the BNs before the ReLUs are the last blocks'."""
    model = build_model(name, 10, 3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        s, (f, z) = model.forward_stages(x), model(x)
    assert torch.allclose(s.logits, z, atol=1e-5) and torch.allclose(s.features, f, atol=1e-5)
    assert s.preact[0] is s.maps[0] and len(s.maps) == 5
    assert all(torch.equal(torch.relu(p), m) and (p < 0).any() for p, m in zip(s.preact[1:], s.maps[1:]))
    bns = model.bn_before_relu()
    assert bns[0] is model.bn1 and bns[-1] is (model.layer4[-1].bn3 if name == "tv:resnet50" else model.layer4[-1].bn2)
    assert [b.num_features for b in bns] == [m.shape[1] for m in s.maps]


def test_state_dict_keys_are_repdistillers():
    """Spot checks of the names its checkpoints carry (all of them: benchmarks/zoo.py loads them strictly)."""
    keys = lambda n: set(build_model(n, 100, 3).state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer3.4.bn2.num_batches_tracked",
            "fc.weight"} <= keys("resnet32x4") and "layer1.0.downsample.0.weight" not in keys("resnet32")
    assert {"layer2.0.shortcut.0.weight", "layer4.2.conv3.weight", "linear.bias"} <= keys("ResNet50")
    assert {"block1.layer.0.convShortcut.weight", "block3.layer.5.bn2.weight", "bn1.weight", "fc.weight"} <= keys("wrn_40_2")
    assert {"block0.0.bias", "block0.1.running_mean", "block4.4.weight", "classifier.weight"} <= keys("vgg13")
    assert {"conv1.0.weight", "blocks.6.0.conv.7.running_var", "conv2.1.weight", "classifier.0.weight"} <= keys("MobileNetV2")
    assert {"layer1.0.conv1.weight", "layer3.3.bn3.bias", "linear.weight"} <= keys("ShuffleV1")
    assert {"layer1.0.conv5.weight", "layer2.7.bn3.weight", "conv2.weight", "bn2.bias", "linear.weight"} <= keys("ShuffleV2")


def test_channel_shuffle_by_hand():
    from kdbench.models.shufflenet import channel_shuffle

    x = torch.arange(6.0).view(1, 6, 1, 1)  # channels 0..5 in 2 groups of 3 -> 0 3 1 4 2 5
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]


def test_unknown_model_names_the_registry():
    with pytest.raises(ValueError, match="resnet32x4"):
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
        s = model.forward_stages(x)
        f, z = model(x)
    # Stage maps: 4-D, each resolution at most once, halving from one to the next, the last at the lowest one.
    sizes = [m.shape[-1] for m in s.maps]
    assert len(sizes) >= 3 and all(m.ndim == 4 for m in s.maps) and sizes == sorted(sizes, reverse=True), sizes
    assert (s.preact is None) != name.startswith("tv:resnet")  # torchvision's ResNets give mdistiller's pre-activations
    assert torch.allclose(s.features, f, atol=1e-5) and torch.allclose(s.logits, z, atol=1e-5)


def test_library_model_takes_the_data_sets_channels():
    model = build_model("tv:resnet18", num_classes=10, in_channels=1).eval()
    f, z = model(torch.randn(2, 1, 32, 32))
    assert z.shape == (2, 10) and model.conv1.in_channels == 1


@pytest.mark.parametrize("name", ECOSYSTEM)
def test_library_student_takes_a_distillation_step_with_the_geometry_term(name, synthetic):
    """distill() with the geometry method (CE + KD + geometry) on a few synthetic images: finite losses, weights move."""
    import dataclasses
    import math

    from kdbench.measure import forward_all
    from kdbench.geometry import class_centroids
    from kdbench.methods import METHODS
    from kdbench.settings import Recipe
    from kdbench.train import Teacher, TrainConfig, distill

    data = synthetic
    data = dataclasses.replace(data, train_x=data.train_x[:64], train_y=data.train_y[:64], val_x=data.val_x[:32],
                               val_y=data.val_y[:32], test_x=data.test_x[:32], test_y=data.test_y[:32])
    teacher = build_model("cnn_student", data.num_classes, 3).eval().requires_grad_(False)
    feats, _ = forward_all(teacher, data.train_x, data)
    t = Teacher(teacher, class_centroids(feats, data.train_y, data.num_classes), {"arch": "cnn_student"})
    res = distill(TrainConfig(name, METHODS["geometry"], Recipe(epochs=1, batch_size=32), seed=0), data, t)
    assert all(math.isfinite(res[f"loss_{term}"]) for term in ("ce", "kd", "geometry")), res.metrics
    assert res["loss_geometry"] > 0 and -1 <= res["test_geom_corr"] <= 1


def test_bad_library_names_say_what_is_allowed():
    from kdbench.models import check_model

    for name, fragment in (("tv:resnet9000", "torchvision has no classification model 'resnet9000'"),
                           ("timm:nonexistent_net", "timm has no model"), ("keras:resnet", "unknown library"),
                           ("vgg", "tv:NAME"), ("resnet999", "ShuffleV2")):
        with pytest.raises(ValueError, match=fragment):
            check_model(name)
