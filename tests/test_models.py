import pytest
import torch

from fairtune.models import build_model


@pytest.mark.parametrize(
    "name, size, feature_dim, map_shape",
    [
        ("cnn", 32, 256, (128, 8, 8)),  # docs/protocol.md §3: 256-d FC features, conv6 map 128x8x8
        ("resnet18", 176, 512 * 6 * 6, (512, 6, 6)),  # layer4 before pooling, flattened
        ("shufflenet_v2_x1_0", 176, 1024 * 6 * 6, (1024, 6, 6)),  # conv5 before pooling, flattened
    ],
)
def test_one_interface_for_every_architecture(name, size, feature_dim, map_shape):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert out.logits.shape == (2, 3)
    assert out.features.shape == (2, feature_dim)
    assert out.feature_map.shape == (2, *map_shape)
    if name != "cnn":  # features are the map itself, flattened
        assert torch.equal(out.features, out.feature_map.flatten(1))


def test_cnn_features_are_the_relu_fc_output_feeding_the_head():
    model = build_model("cnn", 10).eval()
    with torch.no_grad():
        out = model(torch.rand(4, 3, 32, 32))
        assert (out.features >= 0).all()
        assert torch.allclose(model.head(out.features), out.logits)
    assert sum(p.numel() for p in model.fc.parameters()) == 2048 * 256 + 256


def test_no_pretrained_weights_are_downloaded(monkeypatch):
    import torch.hub

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download weights"))
    build_model("resnet18", 2)
    build_model("shufflenet_v2_x1_0", 2)


def test_unknown_model():
    with pytest.raises(ValueError, match="valid"):
        build_model("vgg", 2)
