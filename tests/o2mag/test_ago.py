"""AGO: the embedding moves downhill on the reference, the UNet stays frozen, the bank caches."""
import numpy as np
import pytest
import torch

from o2mag.method.ago import dilate_mask, optimize_embedding
from o2mag.pipeline import O2MAGPipeline


@pytest.fixture(scope="module")
def image():
    return (np.random.RandomState(0).rand(128, 128, 3) * 255).astype(np.uint8)


def _eval_loss(pipe, z, emb):
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for _ in range(8):
            t = int(torch.randint(0, 1000, (1,), generator=g))
            n = torch.randn(z.shape, generator=g)
            a = pipe.scheduler.alphas_cumprod[t]
            x = a.sqrt() * z + (1 - a).sqrt() * n
            total += ((pipe.unet(x, t, encoder_hidden_states=emb).sample - n) ** 2).mean().item()
    return total / 8


def test_ago_lowers_the_noise_prediction_loss_and_keeps_unet_frozen(pipe, image):
    z = pipe.encode_image(image)
    init = pipe.encode_prompt("a photo of a crack")
    before = [p.detach().clone() for p in pipe.unet.parameters()]
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    emb = optimize_embedding(pipe.unet, pipe.scheduler, z, init, steps=20, lr=1e-2,
                             generator=torch.Generator().manual_seed(0), progress=False)
    assert emb.shape == init.shape and torch.isfinite(emb).all()
    assert not torch.equal(emb, init)
    assert _eval_loss(pipe, z, emb) < _eval_loss(pipe, z, init)
    assert all(torch.equal(a, b) for a, b in zip(before, pipe.unet.parameters()))
    assert flags == [p.requires_grad for p in pipe.unet.parameters()]


def test_ago_mask_weighting(pipe, image):
    z = pipe.encode_image(image)
    init = pipe.encode_prompt("a photo of a crack")

    def run(weight):
        return optimize_embedding(pipe.unet, pipe.scheduler, z, init, steps=3, lr=1e-2, weight=weight,
                                  generator=torch.Generator().manual_seed(0), progress=False)

    plain = run(None)
    ones = run(torch.ones(16, 16))
    mask = torch.zeros(128, 128, dtype=torch.bool)
    mask[40:60, 40:60] = True
    local = run(dilate_mask(mask, (16, 16)))
    assert torch.allclose(plain, ones, atol=1e-5)
    assert not torch.allclose(plain, local, atol=1e-5)


def test_dilate_mask_keeps_small_defects():
    m = torch.zeros(128, 128, dtype=torch.bool)
    m[3, 3] = True  # one pixel: nearest-neighbour downsampling would lose it
    d = dilate_mask(m, (16, 16), radius=0)
    assert d.sum() == 1 and d[0, 0] == 1
    assert dilate_mask(m, (16, 16), radius=1).sum() == 4


def test_ago_arguments(pipe, image):
    z = pipe.encode_image(image)
    init = pipe.encode_prompt("x")
    assert torch.equal(optimize_embedding(pipe.unet, pipe.scheduler, z, init, steps=0, progress=False), init)
    with pytest.raises(ValueError, match="lr"):
        optimize_embedding(pipe.unet, pipe.scheduler, z, init, steps=1, lr=0, progress=False)
    with pytest.raises(ValueError, match="steps"):
        optimize_embedding(pipe.unet, pipe.scheduler, z, init, steps=-1, progress=False)


def test_embedding_bank(tmp_path, image):
    p = O2MAGPipeline.tiny(0)
    p.progress = False
    p.cache_dir = str(tmp_path)
    a = p.optimize_embedding(image, "a photo of a crack", steps=2)
    b = p.optimize_embedding(image, "a photo of a crack", steps=2)
    assert p.stats.ago_runs == 1 and torch.equal(a, b)
    assert len(list((tmp_path / "embeddings").glob("*.pt"))) == 1
    p.optimize_embedding(image, "a photo of a scratch", steps=2)
    assert p.stats.ago_runs == 2
    q = O2MAGPipeline.tiny(0)
    q.progress = False
    q.cache_dir = str(tmp_path)
    c = q.optimize_embedding(image, "a photo of a crack", steps=2)
    assert q.stats.ago_runs == 0 and torch.allclose(a, c)


def test_ago_skips_non_finite_steps(pipe, image):
    # a UNet output that overflows on some draws must not poison the embedding
    z = pipe.encode_image(image)
    init = pipe.encode_prompt("x")
    calls = {"n": 0}

    class Flaky(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet
            self.dtype = unet.dtype

        def forward(self, *a, **k):
            calls["n"] += 1
            out = self.unet(*a, **k)
            if calls["n"] % 2 == 0:
                out.sample = out.sample * float("inf")
            return out

    emb = optimize_embedding(Flaky(pipe.unet), pipe.scheduler, z, init, steps=4, lr=1e-2,
                             generator=torch.Generator().manual_seed(0), progress=False)
    assert calls["n"] == 4 and torch.isfinite(emb).all() and not torch.equal(emb, init)


def test_model_fingerprint_reads_weights_under_sequential_offload():
    """accelerate's sequential CPU offload leaves meta parameters (weights in the hooks): the
    fingerprint -- part of every cache key -- must still read them, and equal the plain model's."""
    import copy

    from accelerate import cpu_offload

    from o2mag.pipeline.caches import model_fingerprint

    class Scaled(torch.nn.Module):  # a parameter of its own at the top: accelerate chains hooks
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.randn(3))
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))

    torch.manual_seed(0)
    for model in (torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(),
                                      torch.nn.Sequential(torch.nn.Linear(4, 3))), Scaled()):
        offloaded = copy.deepcopy(model)
        cpu_offload(offloaded, execution_device=torch.device("cpu"))
        assert all(p.device.type == "meta" for p in offloaded.parameters())
        assert model_fingerprint("m", [offloaded]) == model_fingerprint("m", [model])
        with torch.no_grad():
            list(model.parameters())[-1].add_(1.0)  # another model under the same name: another key
        assert model_fingerprint("m", [offloaded]) != model_fingerprint("m", [model])
