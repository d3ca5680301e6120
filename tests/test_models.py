"""ResNet backbones with AIBN, state-dict loading, the classifier head, shared alphas."""
import numpy as np
import pytest
import torch
from torch import nn

from iics_fast.models import AIBN2d, ClassifierHead, aibn_alphas, build_backbone, load_pretrained


def _torchvision_format(model, with_fc=True):
    """A state dict named and shaped like torchvision's: plain BN entries (with
    num_batches_tracked), no alpha, optionally the ImageNet classifier."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".alpha")}
    for k in list(sd):
        if k.endswith(".running_var"):
            sd[k[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(7)
    if with_fc:
        sd["fc.weight"] = torch.randn(1000, model.out_dim)
        sd["fc.bias"] = torch.randn(1000)
    return sd


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name
                        else torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("arch,dim,n_alpha,n_aibn",
                         [("resnet50", 2048, 9, 6 * 3 + 3 * 3 + 2), ("resnet18", 512, 4, 4 * 2 + 2)])
def test_shared_alphas(arch, dim, n_alpha, n_aibn):
    m = build_backbone(arch, init_alpha=0.25)
    assert m.out_dim == dim
    alphas = aibn_alphas(m)
    assert len(alphas) == n_alpha
    assert all(a.item() == 0.25 for a in alphas)
    aibns = [mod for mod in m.modules() if isinstance(mod, AIBN2d)]
    assert len(aibns) == n_aibn
    # every BN of layer3/4 is AIBN, none elsewhere; one block's norms share its alpha
    for name, mod in m.named_modules():
        is_norm = isinstance(mod, (nn.BatchNorm2d, AIBN2d))
        if is_norm:
            assert isinstance(mod, AIBN2d) == name.startswith(("layer3", "layer4")), name
    block = m.layer3[0]
    norms = [block.bn1, block.bn2, block.downsample[1]] + ([block.bn3] if arch == "resnet50" else [])
    assert all(n.alpha is block.bn1.alpha for n in norms)
    assert m.layer3[1].bn1.alpha is not block.bn1.alpha
    # the optimiser sees each alpha once
    params = list(m.parameters())
    assert sum(any(p is a for p in params) for a in alphas) == n_alpha
    assert len(params) == len({id(p) for p in params})


def test_last_stride_and_forward_backward_resnet18():
    torch.manual_seed(0)
    m = build_backbone("resnet18")
    x = torch.randn(3, 3, 64, 32)
    feats = {}
    m.layer4.register_forward_hook(lambda mod, i, o: feats.update(l4=o.shape))
    f = m(x)
    assert f.shape == (3, 512) and feats["l4"][-2:] == (4, 2)  # last stride 1: /16, not /32
    f.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)
    assert all(a.grad.abs().item() > 0 for a in aibn_alphas(m))
    assert build_backbone("resnet18", last_stride=2)(x).shape == (3, 512)


def test_channels_last_matches_contiguous():
    torch.manual_seed(1)
    m = build_backbone("resnet18")
    _randomise(m)
    x = torch.randn(2, 3, 64, 32)
    for train in (True, False):
        m.train(train)
        ref = m(x)
        cl = m.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        m.to(memory_format=torch.contiguous_format)
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)


def test_round_trip_own_state_dict(tmp_path):
    src = build_backbone("resnet18", init_alpha=0.3)
    _randomise(src)
    path = tmp_path / "own.pth"
    torch.save(src.state_dict(), path)
    dst = build_backbone("resnet18", pretrained=path)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0)
    assert [a.item() for a in aibn_alphas(dst)] == [a.item() for a in aibn_alphas(src)]
    x = torch.randn(2, 3, 64, 32)
    src.eval(), dst.eval()
    torch.testing.assert_close(dst(x), src(x))


@pytest.mark.parametrize("arch,with_fc", [("resnet50", True), ("resnet18", False)])
def test_torchvision_named_dict_loads(tmp_path, arch, with_fc):
    donor = build_backbone(arch)
    _randomise(donor)
    sd = _torchvision_format(donor, with_fc)
    path = tmp_path / "tv.pth"
    torch.save(sd, path)
    m = build_backbone(arch, pretrained=str(path), init_alpha=0.1)
    got = m.state_dict()
    for k, v in sd.items():
        if not k.startswith("fc.") and not (k.endswith("num_batches_tracked") and k not in got):
            assert torch.equal(got[k], v), k
    last = len(m.layer4) - 1
    aibn = m.layer4[last].bn2  # AIBN modules take BN weight, bias and running statistics
    assert isinstance(aibn, AIBN2d)
    assert torch.equal(aibn.running_var, sd[f"layer4.{last}.bn2.running_var"])
    assert torch.equal(aibn.weight, sd[f"layer4.{last}.bn2.weight"])
    assert all(a.item() == pytest.approx(0.1) for a in aibn_alphas(m))


def test_wrong_arch_names_mismatch_and_fix(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(_torchvision_format(build_backbone("resnet18")), path)
    with pytest.raises(ValueError, match=r"holds resnet18 weights but the model is resnet50: use "
                                         r"--arch resnet18 \(arch='resnet18' from Python\)") as err:
        build_backbone("resnet50", pretrained=path)
    assert "\n" not in str(err.value)  # the command line's error is one line
    # a layout this project does not build: no --arch to suggest
    r34 = {f"layer{i}.{j}.conv1.weight": torch.zeros(1)
           for i, blocks in enumerate((3, 4, 6, 3), 1) for j in range(blocks)}
    torch.save(r34, path)
    with pytest.raises(ValueError, match=r"holds resnet34 weights but the model is resnet50: this "
                                         r"project builds resnet18 and resnet50: pass resnet50 weights"):
        build_backbone("resnet50", pretrained=path)


def test_wrong_shape_unexpected_and_missing_keys(tmp_path):
    model = build_backbone("resnet18")
    sd = _torchvision_format(model)
    bad = dict(sd, **{"layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)})
    torch.save(bad, tmp_path / "a.pth")
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight: file \(64, 64, 1, 1\) vs model \(64, 64, 3, 3\)"):
        load_pretrained(model, tmp_path / "a.pth")
    torch.save(dict(sd, extra_head=torch.zeros(3)), tmp_path / "b.pth")
    with pytest.raises(ValueError, match=r"unexpected keys.*extra_head"):
        load_pretrained(model, tmp_path / "b.pth")
    torch.save({k: v for k, v in sd.items() if k != "layer3.1.bn2.running_mean"}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match=r"missing keys.*layer3\.1\.bn2\.running_mean"):
        load_pretrained(model, tmp_path / "c.pth")
    with pytest.raises(FileNotFoundError, match="pretrained weights not found"):
        load_pretrained(model, tmp_path / "nope.pth")
    (tmp_path / "d.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read .* as a tensor state dict: [^\n]+$"):
        load_pretrained(model, tmp_path / "d.pth")
    torch.save({"model": sd, "inter_labels": np.arange(3)}, tmp_path / "last.pt")  # a run's
    with pytest.raises(ValueError, match=r"Python objects besides tensors \(a training checkpoint "
                                         r"such as last.pt or best.pt\? a run continues with --resume"):
        load_pretrained(model, tmp_path / "last.pt")
    torch.save({"config": {"arch": "resnet18"}, "round": 3, "model": sd}, tmp_path / "best.pt")
    with pytest.raises(ValueError, match=r"best.pt' is a training run's checkpoint, not a state "
                                         r"dict \(a training checkpoint"):
        load_pretrained(model, tmp_path / "best.pt")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown arch 'resnet101'"):
        build_backbone("resnet101")
    with pytest.raises(ValueError, match="last_stride"):
        build_backbone("resnet18", last_stride=3)
    m = build_backbone("resnet18")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m(torch.randn(2, 1, 64, 32))
    with pytest.raises(ValueError, match="H\\*W >= 2"):
        m(torch.randn(2, 3, 16, 16))  # layer3 would be 1x1


def test_classifier_head_init_and_frozen_bias():
    torch.manual_seed(0)
    head = ClassifierHead(2048, 600)
    assert isinstance(head.bn, nn.BatchNorm1d) and isinstance(head.classifier, nn.Linear)
    assert head.classifier.bias is None and head.classifier.weight.shape == (600, 2048)
    assert not head.bn.bias.requires_grad and torch.all(head.bn.bias == 0)
    assert head.bn.weight.requires_grad
    assert head.classifier.weight.std().item() == pytest.approx(0.001, rel=0.02)
    assert abs(head.classifier.weight.mean().item()) < 1e-5
    f = torch.randn(8, 2048)
    logits = head(f)
    assert logits.shape == (8, 600)
    logits.sum().backward()
    assert head.bn.bias.grad is None and head.bn.weight.grad is not None
    assert [p for p in head.parameters() if p.requires_grad] == [head.bn.weight, head.classifier.weight]
    with pytest.raises(ValueError, match="num_classes"):
        ClassifierHead(16, 0)


def test_cpu_bf16_when_chosen_is_deterministic_and_finite():
    """Where `amp_dtype` picks bf16 on this CPU, a small strided convolution (the shape of
    ResNet-18's layer3 entry on a 32x16 input) gives the same finite values on every call."""
    from iics_fast import models

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(128, 256, 3, 2, 1, bias=False).eval()
    x = torch.randn(8, 128, 4, 2)
    dtype = models.amp_dtype("bf16", torch.device("cpu"))
    outs = []
    for _ in range(40):
        with torch.no_grad(), models.autocast(dtype, torch.device("cpu")):
            outs.append(conv(x).float())
    assert all(torch.isfinite(y).all() and torch.equal(y, outs[0]) for y in outs)


def test_amp_dtype_per_device(monkeypatch):
    from iics_fast import models

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert models.amp_dtype("off", cpu) is None and models.amp_dtype("off", cuda) is None
    assert models.amp_dtype("bf16", cuda) is torch.bfloat16
    assert models.amp_dtype("fp16", cuda) is torch.float16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device.*--amp bf16"):
        models.amp_dtype("fp16", cpu)
    # a CPU without native bf16 keeps float32 (emulated bf16 is slower), one with it runs bf16
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert models.amp_dtype("bf16", cpu) is None
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.amp_dtype("bf16", cpu) is torch.bfloat16


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no native bf16")
def test_amx_cpus_keep_float32(monkeypatch):
    from iics_fast import _native, models

    real = _native.cpu_info()
    assert real["model"] and real["flags"]  # this CPU computes bf16 natively: Linux lists its flags
    monkeypatch.setattr(_native, "cpu_info", lambda: {**real, "flags": real["flags"] | {"amx_bf16"}})
    assert not models.cpu_has_native_bf16()
    monkeypatch.setattr(_native, "cpu_info", lambda: {**real, "flags": real["flags"] - {"amx_bf16"}})
    assert models.cpu_has_native_bf16()


def test_bf16_autocast_pools_in_float32_and_stays_close():
    torch.manual_seed(0)
    m = build_backbone("resnet18").eval()
    x = torch.randn(4, 3, 64, 32)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f = m(x)
    assert f.dtype == torch.float32  # the feature distances are taken on is float32
    cos = torch.nn.functional.cosine_similarity(f, ref)
    assert cos.min() > 0.99, cos
