"""DDIM inversion: exact mirror of DDIMScheduler.step, replay bookkeeping, caching by content."""
import numpy as np
import pytest
import torch

from o2mag.method.inversion import Inversion, ddim_invert, ddim_step
from o2mag.pipeline import O2MAGPipeline
from o2mag.sources.tiny import tiny_scheduler


def _denoise(scheduler, inv, predict):
    z = inv.noise
    for t in inv.timesteps:
        z = ddim_step(scheduler, predict(z, t), t, z)
    return z


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_inversion_mirrors_the_scheduler_step(steps):
    # with a noise prediction that depends on t only, invert-then-denoise must be exact
    sch = tiny_scheduler()
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    table = {}

    def predict(z, t):
        t = int(t)
        if t not in table:
            table[t] = torch.randn(z.shape, generator=torch.Generator().manual_seed(t))
        return table[t]

    inv = ddim_invert(predict, sch, z0, steps, progress=False)
    assert len(inv.latents) == steps + 1 and inv.num_steps == steps
    err = (_denoise(sch, inv, predict) - z0).abs().max().item()
    assert err < 1e-4, err


def test_inversion_of_a_smooth_model_reconstructs():
    # a smooth (trained-like) noise predictor: DDIM inversion is then accurate; error shrinks with steps
    sch = tiny_scheduler()
    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))

    def predict(z, t):
        return 0.1 * z + 0.05 * torch.sin(z)

    errs = []
    for steps in (10, 50):
        inv = ddim_invert(predict, sch, z0, steps, progress=False)
        errs.append((_denoise(sch, inv, predict) - z0).abs().max().item())
    assert errs[1] < errs[0] and errs[1] < 0.15, errs


def test_replay_indices():
    lat = [torch.full((1, 1, 1, 1), float(k)) for k in range(5)]
    inv = Inversion(lat, torch.tensor([750, 500, 250, 0]))
    assert inv.before_step(0).item() == 4 and inv.noise.item() == 4
    assert inv.after_step(0).item() == 3 and inv.before_step(1).item() == 3
    assert inv.after_step(3).item() == 0


def test_invalid_steps():
    with pytest.raises(ValueError, match="num_steps"):
        ddim_invert(lambda z, t: z, tiny_scheduler(), torch.zeros(1, 4, 2, 2), 0, progress=False)


def test_pipeline_inversion_is_cached_in_memory_and_on_disk(tmp_path):
    pipe = O2MAGPipeline.tiny(0)
    pipe.progress = False
    pipe.cache_dir = str(tmp_path)
    img = (np.random.RandomState(0).rand(128, 128, 3) * 255).astype(np.uint8)
    a = pipe.invert(img, 3, cache_to_disk=True)
    b = pipe.invert(img, 3, cache_to_disk=True)
    assert pipe.stats.inversion_runs == 1 and pipe.stats.inversion_cache_hits == 1
    assert all(torch.equal(x, y) for x, y in zip(a.latents, b.latents))
    pipe.invert(img, 4)  # other settings -> new inversion
    img2 = img.copy()
    img2[0, 0, 0] ^= 1  # other content -> new inversion
    pipe.invert(img2, 3)
    assert pipe.stats.inversion_runs == 3
    # a fresh pipeline on the same model finds the disk cache
    other = O2MAGPipeline.tiny(0)
    other.progress = False
    other.cache_dir = str(tmp_path)
    c = other.invert(img, 3, cache_to_disk=True)
    assert other.stats.inversion_runs == 0
    assert all(torch.allclose(x, y) for x, y in zip(a.latents, c.latents))
    # another model (other seed) must not reuse it
    third = O2MAGPipeline.tiny(1)
    third.progress = False
    third.cache_dir = str(tmp_path)
    third.invert(img, 3, cache_to_disk=True)
    assert third.stats.inversion_runs == 1
    # first latent is the VAE latent of the image, every latent finite
    assert torch.allclose(a.latents[0], pipe.encode_image(img))
    assert all(torch.isfinite(z).all() for z in a.latents)


def test_replayed_latent_of_each_step_has_that_steps_noise_level():
    # With a constant noise prediction e, DDIM inversion is exact: the latent at timestep t is
    # sqrt(a_t) x0 + sqrt(1 - a_t) e. So the latent a source branch feeds to the UNet at denoising
    # step i (timestep t_i) must match a_{t_i}, and the one it holds after the step a_{t_{i+1}}
    # (an off-by-one between inversion latents and denoising timesteps breaks this).
    sch = tiny_scheduler()
    z0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    e = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    steps = 10
    inv = ddim_invert(lambda z, t: e, sch, z0, steps, progress=False)
    ac = sch.alphas_cumprod.double()
    a_final = float(sch.final_alpha_cumprod)
    x0 = (z0.double() - (1 - a_final) ** 0.5 * e.double()) / a_final ** 0.5

    def at(t):
        return ac[int(t)].sqrt() * x0 + (1 - ac[int(t)]).sqrt() * e.double()

    ts = sch.timesteps
    for i in range(steps):
        torch.testing.assert_close(inv.before_step(i).double(), at(ts[i]), atol=1e-5, rtol=1e-5)
        nxt = at(ts[i + 1]) if i + 1 < steps else z0.double()
        torch.testing.assert_close(inv.after_step(i).double(), nxt, atol=1e-5, rtol=1e-5)
