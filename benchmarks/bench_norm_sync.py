"""Stage 1's step: the cameras in one forward with per-camera statistics
(`norm_sync.grouped_batch_stats`, the default) against one forward a camera (the reference's
loop, `--stage1-forward per-camera`), at the demo's shape: ResNet-18 with AIBN, 64x32 input, 4
cameras x 8 images, a head a camera, one SGD step, in the autocast the trainer uses on this CPU.
Both sides compute the same step (checked first); conftest's side_by_side times them in the
same rounds and measures their peak memory.

    pytest benchmarks/bench_norm_sync.py -s
"""
import torch
import torch.nn.functional as F

from iics_fast import models, norm_sync

CAMERAS, PER_CAMERA, CLASSES = 4, 8, 150


def _setup(seed=0):
    torch.manual_seed(seed)
    net = models.build_backbone(arch="resnet18").train()
    heads = torch.nn.ModuleList(models.ClassifierHead(net.out_dim, CLASSES) for _ in range(CAMERAS)).train()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(CAMERAS * PER_CAMERA, 3, 64, 32, generator=g)
    y = torch.randint(0, CLASSES, (CAMERAS * PER_CAMERA,), generator=g)
    opt = torch.optim.SGD(list(net.parameters()) + list(heads.parameters()), lr=1e-3, momentum=0.9)
    return net, heads, x, y, opt


def _autocast():
    cpu = torch.device("cpu")
    return models.autocast(models.amp_dtype("bf16", cpu), cpu)


def step(impl, net, heads, x, y, opt):
    """One stage-1 step; returns the summed loss."""
    opt.zero_grad(set_to_none=True)
    rows = [slice(c * PER_CAMERA, (c + 1) * PER_CAMERA) for c in range(CAMERAS)]
    if impl == "ours":
        with norm_sync.grouped_batch_stats(net, CAMERAS), _autocast():
            f = net(x)
            loss = sum(F.cross_entropy(heads[c](f[r]).float(), y[r]) for c, r in enumerate(rows))
        loss.backward()
        loss = loss.item()
    else:
        loss = 0.0
        for c, r in enumerate(rows):
            with _autocast():
                part = F.cross_entropy(heads[c](net(x[r])).float(), y[r])
            part.backward()
            loss += part.item()
    opt.step()
    return loss


PEER = "one forward a camera (the reference's loop)"


def build(impl):
    """Inputs and one stage-1 step of `impl` (for conftest's memory_probe)."""
    state = _setup()
    step(impl, *state)
    return lambda: step(impl, *state)


def test_stage1_step_vs_per_camera(side_by_side):
    """The same step both ways (from equal weights: equal losses up to rounding), then timed."""
    a, b = _setup(), _setup()
    assert abs(step("ours", *a) - step("peer", *b)) < 1e-3
    ours, peer = _setup(), _setup()
    side_by_side("stage 1 step (4 cameras x 8 images)", "ResNet-18 64x32, the CPU's autocast",
                 lambda: step("ours", *ours), {PEER: lambda: step("peer", *peer)}, rounds=10,
                 memory={("ours" if k == "ours" else PEER): dict(module_file=__file__, impl=k)
                         for k in ("ours", "peer")})
