"""AttentionGraft: real diffusers processors that graft target rows onto the source branches.

Module-level tests compare against attention written out by hand (einsum + masked softmax) on one
diffusers ``Attention``; UNet-level tests use the tiny SD-shaped UNet (16 transformer blocks).
"""
import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from o2mag import AttentionGraft, BranchLayout, GraftConfig
from o2mag.graft import GraftCrossAttnProcessor, GraftSelfAttnProcessor, SourceCache, transformer_layers
from o2mag_kernels.backends import triton_status

ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def heads_view(x, heads):
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def masked_attention(q, k, v, key_mask=None, gain=1.0):
    """softmax(gain * q k^T / sqrt(d)) v over the keys in key_mask (all when None or empty)."""
    logits = gain * torch.einsum("hid,hjd->hij", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None and key_mask.any():
        logits = logits.masked_fill(~key_mask, float("-inf"))
    return torch.einsum("hij,hjd->hid", logits.softmax(-1), v)


def project_out(attn, o):
    """(H, L, D) -> the module's output for one row."""
    h, n, d = o.shape
    return attn.to_out[0](o.transpose(0, 1).reshape(1, n, h * d))[0]


def make_graft(config, layout, step, num_steps=50, ref=None, targets=None, cache=None):
    g = AttentionGraft(config, layout, cache)
    if ref is not None:
        g.set_masks(ref, targets)
    g.set_step(step, num_steps)
    return g


def random_masks(n, size, gen):
    ref = torch.rand(size, size, generator=gen) > 0.6
    tgt = torch.rand(n, size, size, generator=gen) > 0.5
    tgt[0] = False
    tgt[0, 1:4, 2:6] = True  # a block, so routing differs between targets
    return ref, tgt


def unet_inputs(layout, size=8, seed=0, same_targets_as_normal=False):
    gen = torch.Generator().manual_seed(seed)
    n = layout.num_targets
    ref = torch.randn(1, 4, size, size, generator=gen)
    nor = torch.randn(1, 4, size, size, generator=gen)
    tg = nor.expand(n, -1, -1, -1) if same_targets_as_normal else torch.randn(n, 4, size, size, generator=gen)
    lat = layout.assemble(reference=ref, normal=nor, targets=tg)
    unc, cond = torch.randn(2, 1, 77, 32, generator=gen)
    emb = torch.cat([unc.expand(layout.rows_per_half, -1, -1), cond.expand(layout.rows_per_half, -1, -1)])
    return lat, emb


# ---------------------------------------------------------------------------------------------
# AttnProcessor2_0 parity
# ---------------------------------------------------------------------------------------------
def _variants():
    torch.manual_seed(0)
    b = 4
    out = []
    a = Attention(query_dim=64, heads=2, dim_head=40)
    mask = torch.zeros(b, 1, 24)
    mask[:, :, 5:9] = -1e4
    out.append(("mask_hd40", a, dict(hidden_states=torch.randn(b, 24, 64), attention_mask=mask), False))
    a = Attention(query_dim=32, heads=1, dim_head=64, norm_num_groups=8, residual_connection=True,
                  rescale_output_factor=2.0, bias=True)
    out.append(("groupnorm_4d_hd64", a, dict(hidden_states=torch.randn(b, 32, 6, 5)), False))
    a = Attention(query_dim=32, heads=2, dim_head=16, spatial_norm_dim=4, residual_connection=True)
    out.append(("spatialnorm", a, dict(hidden_states=torch.randn(b, 32, 4, 4),
                                       temb=torch.randn(b, 4, 2, 2)), False))
    a = Attention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=40,
                  cross_attention_norm="layer_norm")
    out.append(("cross_normcross", a, dict(hidden_states=torch.randn(b, 24, 64),
                                           encoder_hidden_states=torch.randn(b, 7, 32)), True))
    return out


@pytest.mark.parametrize("case", _variants(), ids=lambda c: c[0])
def test_processors_match_attnprocessor2_0_when_idle(case):
    _, attn, kwargs, cross = case
    attn.eval()
    # paper config, but a step/layer where nothing is active (step 45: no DAE; layer 0: no TriAG)
    g = make_graft(GraftConfig.paper(), BranchLayout(2), step=45)
    proc = (GraftCrossAttnProcessor if cross else GraftSelfAttnProcessor)(g, 0, "x.processor")
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, **kwargs)
        got = proc(attn, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_disabled_unet_equals_diffusers_and_restores_processors(tiny_unet):
    layout = BranchLayout(2)
    lat, emb = unet_inputs(layout)
    before = dict(tiny_unet.attn_processors)
    with torch.no_grad():
        expected = tiny_unet(lat, 500, encoder_hidden_states=emb).sample
        g = AttentionGraft(GraftConfig.disabled(), layout)
        with g.installed(tiny_unet):
            procs = tiny_unet.attn_processors  # nothing to graft: nothing installed
            assert all(procs[k] is before[k] for k in before)
            got = tiny_unet(lat, 500, encoder_hidden_states=emb).sample  # no set_step needed
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    after = tiny_unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    with pytest.raises(KeyError, match="boom"):
        with g.installed(tiny_unet):
            raise KeyError("boom")
    after = tiny_unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_disabled_unet_head_dim_64(tiny_unet_hd64):
    layout = BranchLayout(1)
    lat, emb = unet_inputs(layout)
    with torch.no_grad():
        expected = tiny_unet_hd64(lat, 10, encoder_hidden_states=emb).sample
        with AttentionGraft(GraftConfig.disabled(), layout).installed(tiny_unet_hd64):
            got = tiny_unet_hd64(lat, 10, encoder_hidden_states=emb).sample
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# hand-computed rows on one layer
# ---------------------------------------------------------------------------------------------
_TRITON_CPU = pytest.param("triton", marks=pytest.mark.skipif(
    not triton_status(torch.device("cpu"))[0],
    reason="the Triton kernel runs on CPU tensors only under TRITON_INTERPRET=1 (the README's test "
           "command and CI set it)"))


@pytest.mark.parametrize("backend", ["torch", "reference", _TRITON_CPU])
@pytest.mark.parametrize("num_targets", [1, 3])
@pytest.mark.parametrize("heads, dim_head", [(2, 40), (1, 64)])
def test_graft_rows_get_the_right_sources(backend, num_targets, heads, dim_head):
    gen = torch.Generator().manual_seed(num_targets * 7 + dim_head)
    layout = BranchLayout(num_targets)
    torch.manual_seed(1)
    attn = Attention(query_dim=32, heads=heads, dim_head=dim_head).eval()
    x = torch.randn(layout.batch_size, 64, 32, generator=gen)
    ref, tgt = random_masks(num_targets, 8, gen)  # latent-size masks: layer 8x8 uses them as they are
    cfg = GraftConfig.paper(backend=backend)
    g = make_graft(cfg, layout, step=30, ref=ref, targets=tgt)
    with torch.no_grad():
        got = GraftSelfAttnProcessor(g, 12, "x.processor")(attn, x)
        q, k, v = (heads_view(f(x), heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        for half in (0, 1):
            r, n = layout.rows("reference", half)[0], layout.rows("normal", half)[0]
            for row in (r, n):  # sources: ordinary self-attention
                exp = project_out(attn, masked_attention(q[row], k[row], v[row]))
                torch.testing.assert_close(got[row], exp, atol=ATOL, rtol=1e-5)
            for t in range(num_targets):
                row = layout.rows("target", half, target=t)[0]
                fg = masked_attention(q[row], k[r], v[r], ref.flatten(), gain=1 / 0.7)
                bg = masked_attention(q[row], k[n], v[n], ~tgt[t].flatten())
                inside = tgt[t].flatten()[None, :, None]
                exp = project_out(attn, torch.where(inside, fg, bg))
                torch.testing.assert_close(got[row], exp, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_qgraft_phase_uses_source_queries(backend):
    gen = torch.Generator().manual_seed(3)
    layout = BranchLayout(2)
    torch.manual_seed(2)
    attn = Attention(query_dim=32, heads=2, dim_head=40).eval()
    x = torch.randn(layout.batch_size, 64, 32, generator=gen)
    ref, tgt = random_masks(2, 8, gen)
    g = make_graft(GraftConfig.paper(backend=backend), layout, step=2, ref=ref, targets=tgt)
    with torch.no_grad():
        got = GraftSelfAttnProcessor(g, 0, "x.processor")(attn, x)  # layer 0: Q graft only
        q, k, v = (heads_view(f(x), heads=2) for f in (attn.to_q, attn.to_k, attn.to_v))
        for half in (0, 1):
            r, n = layout.rows("reference", half)[0], layout.rows("normal", half)[0]
            for t in range(2):
                row = layout.rows("target", half, target=t)[0]
                fg = masked_attention(q[r], k[r], v[r], ref.flatten())  # gain 1 in this phase
                bg = masked_attention(q[n], k[n], v[n], ~tgt[t].flatten())
                exp = project_out(attn, torch.where(tgt[t].flatten()[None, :, None], fg, bg))
                torch.testing.assert_close(got[row], exp, atol=ATOL, rtol=1e-5)


def test_full_masks_give_target_query_over_reference():
    gen = torch.Generator().manual_seed(4)
    layout = BranchLayout(3)
    torch.manual_seed(3)
    attn = Attention(query_dim=32, heads=2, dim_head=40).eval()
    x = torch.randn(layout.batch_size, 64, 32, generator=gen)
    ones = torch.ones(128, 128)  # image-space, every pyramid level full
    g = make_graft(GraftConfig.paper(fg_gain=2.5), layout, step=10, ref=ones,
                   targets=ones.expand(3, -1, -1))
    with torch.no_grad():
        got = GraftSelfAttnProcessor(g, 9, "x.processor")(attn, x)
        q, k, v = (heads_view(f(x), heads=2) for f in (attn.to_q, attn.to_k, attn.to_v))
        for half in (0, 1):
            r = layout.rows("reference", half)[0]
            for row in layout.rows("target", half):
                exp = project_out(attn, masked_attention(q[row], k[r], v[r], gain=2.5))
                torch.testing.assert_close(got[row], exp, atol=ATOL, rtol=1e-5)


def test_four_d_input_grafts_like_three_d():
    gen = torch.Generator().manual_seed(5)
    layout = BranchLayout(2)
    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    x = torch.randn(layout.batch_size, 32, 4, 6, generator=gen)  # non-square 4x6 grid
    ref = torch.zeros(32, 48, dtype=torch.bool)
    ref[8:20, 10:30] = True
    tgt = torch.zeros(2, 32, 48, dtype=torch.bool)
    tgt[0, :16, :24] = True
    tgt[1, 20:, 30:] = True
    g = make_graft(GraftConfig.paper(), layout, step=20, ref=ref, targets=tgt)
    proc = GraftSelfAttnProcessor(g, 15, "x.processor")
    with torch.no_grad():
        four = proc(attn, x)
        three = proc(attn, x.flatten(2).transpose(1, 2))
    torch.testing.assert_close(four.flatten(2).transpose(1, 2), three, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# DAE
# ---------------------------------------------------------------------------------------------
def test_dae_changes_only_conditional_target_rows_inside_mask():
    gen = torch.Generator().manual_seed(6)
    layout = BranchLayout(2)
    torch.manual_seed(4)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=40).eval()
    x = torch.randn(layout.batch_size, 64, 32, generator=gen)
    enc = torch.randn(layout.batch_size, 9, 16, generator=gen)
    _, tgt = random_masks(2, 8, gen)
    tokens = [2, 5]
    g = make_graft(GraftConfig.paper(), layout, step=25, ref=torch.ones(8, 8), targets=tgt)
    g.set_token_indices(tokens)
    proc = GraftCrossAttnProcessor(g, 4, "x.processor")
    with torch.no_grad():
        plain = AttnProcessor2_0()(attn, x, encoder_hidden_states=enc)
        got = proc(attn, x, encoder_hidden_states=enc)
        q, k, v = heads_view(attn.to_q(x), 2), heads_view(attn.to_k(enc), 2), heads_view(attn.to_v(enc), 2)
    cond_targets = layout.rows("target", "cond")
    for row in range(layout.batch_size):
        if row not in cond_targets:
            torch.testing.assert_close(got[row], plain[row], atol=1e-6, rtol=1e-6)
    for t, row in enumerate(cond_targets):
        inside = tgt[t].flatten()
        torch.testing.assert_close(got[row][~inside], plain[row][~inside], atol=1e-6, rtol=1e-6)
        p = (torch.einsum("hid,hjd->hij", q[row], k[row]) / math.sqrt(40)).softmax(-1)
        p[:, :, tokens] *= 100.0
        p = p / p.sum(-1, keepdim=True)
        with torch.no_grad():
            exp = project_out(attn, torch.einsum("hij,hjd->hid", p, v[row]))
        torch.testing.assert_close(got[row][inside], exp[inside], atol=ATOL, rtol=1e-5)
        assert (got[row][inside] - plain[row][inside]).abs().max() > 1e-3
    # outside the window (or without token indices) nothing changes
    for step in (19, 40):
        g.set_step(step, 50)
        with torch.no_grad():
            torch.testing.assert_close(proc(attn, x, encoder_hidden_states=enc), plain, atol=1e-6, rtol=1e-6)
    g.set_step(25, 50)
    g.set_token_indices([])
    with torch.no_grad():
        torch.testing.assert_close(proc(attn, x, encoder_hidden_states=enc), plain, atol=1e-6, rtol=1e-6)


def test_dae_in_unet_touches_only_conditional_target_rows(tiny_unet):
    layout = BranchLayout(2)
    lat, emb = unet_inputs(layout, seed=1)
    tgt = torch.zeros(2, 64, 64, dtype=torch.bool)
    tgt[:, 16:40, 8:30] = True
    cfg = GraftConfig.disabled(dae_layers=tuple(range(16)), dae_steps=(0.4, 0.8), dae_gain=100.0)
    with torch.no_grad():
        plain = tiny_unet(lat, 400, encoder_hidden_states=emb).sample
        g = AttentionGraft(cfg, layout)
        g.set_masks(torch.zeros(64, 64), tgt)
        g.set_token_indices([3])
        with g.installed(tiny_unet):
            g.set_step(30, 50)
            got = tiny_unet(lat, 400, encoder_hidden_states=emb).sample
            g.set_step(10, 50)
            outside = tiny_unet(lat, 400, encoder_hidden_states=emb).sample
    changed = (got - plain).flatten(1).abs().amax(1) > 1e-4
    assert changed.tolist() == [r in layout.rows("target", "cond") for r in range(layout.batch_size)]
    torch.testing.assert_close(outside, plain, atol=ATOL, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# UNet level: windows, masks, replay
# ---------------------------------------------------------------------------------------------
def test_empty_target_mask_makes_targets_equal_normal(tiny_unet):
    layout = BranchLayout(3)
    lat, emb = unet_inputs(layout, seed=2, same_targets_as_normal=True)
    ref = torch.zeros(64, 64, dtype=torch.bool)
    ref[10:30, 20:50] = True
    g = AttentionGraft(GraftConfig.paper(qgraft_steps=None), layout)
    g.set_masks(ref, torch.zeros(3, 64, 64))
    g.set_token_indices([2])
    with torch.no_grad(), g.installed(tiny_unet):
        g.set_step(25, 50)  # TriAG and DAE window
        out = tiny_unet(lat, 500, encoder_hidden_states=emb).sample
    for half in (0, 1):
        normal = out[layout.rows("normal", half)[0]]
        for row in layout.rows("target", half):
            torch.testing.assert_close(out[row], normal, atol=ATOL, rtol=1e-5)


def test_layer_and_step_windows_follow_the_paper_preset(tiny_unet, monkeypatch):
    layout = BranchLayout(1)
    lat, emb = unet_inputs(layout, seed=3)
    index = {info.self_name: info.index for info in transformer_layers(tiny_unet)}
    dae_calls = []
    real_dae = GraftCrossAttnProcessor._dae

    def spy(self, call, out, hw):
        dae_calls.append(self.graft.plan.step)
        return real_dae(self, call, out, hw)

    monkeypatch.setattr(GraftCrossAttnProcessor, "_dae", spy)
    cache = SourceCache()
    g = AttentionGraft(GraftConfig.paper(), layout, cache)
    m = torch.zeros(64, 64)
    m[20:40, 20:40] = 1
    g.set_masks(m, m[None])
    g.set_token_indices([1])
    steps = [0, 4, 5, 19, 20, 39, 40, 49]
    with torch.no_grad(), g.installed(tiny_unet):
        for s in steps:
            g.set_step(s, 50)
            tiny_unet(lat, 500, encoder_hidden_states=emb)
    grafted = {s: sorted(index[name] for (st, name) in cache.keys() if st == s) for s in steps}
    for s in (0, 4):
        assert grafted[s] == list(range(16))
        assert set(cache._store[(s, next(n for n in index if index[n] == 3))]) == {
            "k_ref", "v_ref", "k_norm", "v_norm", "q_ref", "q_norm"}
    for s in (5, 19, 20, 39, 40, 49):
        assert grafted[s] == list(range(9, 16))
    assert dae_calls == [20] * 16 + [39] * 16


def test_mask_pyramid_max_pool_keeps_small_defects():
    layout = BranchLayout(1)
    g = AttentionGraft(GraftConfig.paper(), layout)
    tgt = torch.zeros(1, 128, 128, dtype=torch.bool)
    tgt[0, 37, 90] = True  # one pixel: nearest sampling at 16x16 reads pixels 0, 8, 16, ... only
    g.set_masks(tgt[0], tgt)
    masks = g.layer_masks("graft", 256, "cpu")
    assert masks.query.shape == (1, 256) and masks.query.nonzero().tolist() == [[0, 4 * 16 + 11]]
    assert masks.fg.nonzero().tolist() == [[0, 4 * 16 + 11]]
    assert masks.bg.all()  # exclusion uses nearest sampling: the pixel is not sampled
    q = g.layer_masks("qgraft", 256, "cpu")
    assert not q.query.any() and torch.equal(q.qsel, q.query)
    assert g.layer_masks("graft", 256, "cpu").query is masks.query  # cached per resolution
    # non-square latents: grid found from the mask's aspect ratio
    wide = torch.zeros(2, 128, 192)
    wide[1, :, 100:] = 1
    g2 = AttentionGraft(GraftConfig.paper(), BranchLayout(2))
    g2.set_masks(wide[1], wide)
    for length, (h, w) in ((384, (16, 24)), (96, (8, 12)), (24, (4, 6)), (6, (2, 3))):
        qm = g2.layer_masks("graft", length, "cpu").query
        assert qm.shape == (2, h * w) and not qm[0].any()
        assert qm[1].view(h, w)[:, -1].all() and not qm[1].view(h, w)[:, 0].any()


@pytest.mark.parametrize("storage", [None, "cpu"])
def test_replay_matches_full_run(tiny_unet, storage):
    layout = BranchLayout(3)
    lat, emb = unet_inputs(layout, seed=4)
    gen = torch.Generator().manual_seed(9)
    ref = torch.rand(64, 64, generator=gen) > 0.7
    tgt = torch.rand(3, 64, 64, generator=gen) > 0.6
    cache = SourceCache(device=storage)
    steps = [1, 7, 25]  # Q graft, TriAG, TriAG + DAE
    full, replay = [], []
    with torch.no_grad():
        g = AttentionGraft(GraftConfig.paper(), layout, cache)
        g.set_masks(ref, tgt)
        g.set_token_indices([4])
        with g.installed(tiny_unet):
            for s in steps:
                g.set_step(s, 50)
                full.append(layout.split(tiny_unet(lat, 900 - 20 * s, encoder_hidden_states=emb).sample).targets)
        assert len(cache) == 16 + 7 + 7 and cache.nbytes() > 0
        rl = layout.for_replay()
        g2 = AttentionGraft(GraftConfig.paper(), rl, cache)
        g2.set_masks(ref, tgt)
        g2.set_token_indices([4])
        lt, et = layout.split(lat).targets, layout.split(emb).targets
        with g2.installed(tiny_unet):
            for s in steps:
                g2.set_step(s, 50)
                replay.append(tiny_unet(lt, 900 - 20 * s, encoder_hidden_states=et).sample)
            for a, b in zip(full, replay):
                torch.testing.assert_close(b, a, atol=ATOL, rtol=1e-5)
            g2.set_step(8, 50)  # never recorded
            with pytest.raises(RuntimeError, match="step 8"):
                tiny_unet(lt, 500, encoder_hidden_states=et)
            g2.set_step(1, 40)  # another schedule
            with pytest.raises(RuntimeError, match="num_steps"):
                tiny_unet(lt, 500, encoder_hidden_states=et)


def test_graft_runs_on_head_dim_64_unet(tiny_unet_hd64):
    layout = BranchLayout(2)
    lat, emb = unet_inputs(layout, seed=5)
    m = torch.zeros(64, 64)
    m[8:30, 8:30] = 1
    with torch.no_grad():
        plain = tiny_unet_hd64(lat, 300, encoder_hidden_states=emb).sample
        g = AttentionGraft(GraftConfig.paper(backend="torch"), layout)
        g.set_masks(m, torch.stack([m, m.flip(0)]))
        with g.installed(tiny_unet_hd64):
            for s in (0, 30):
                g.set_step(s, 50)
                out = tiny_unet_hd64(lat, 300, encoder_hidden_states=emb).sample
                assert torch.isfinite(out).all()
                src = layout.reference_rows + layout.normal_rows
                torch.testing.assert_close(out[src], plain[src], atol=ATOL, rtol=1e-5)
                assert (out[layout.target_rows] - plain[layout.target_rows]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def test_mask_validation():
    g = AttentionGraft(GraftConfig.paper(), BranchLayout(2))
    ok = torch.zeros(2, 16, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="ref_mask"):
        g.set_masks(torch.zeros(1, 16, 16), ok)
    with pytest.raises(ValueError, match="target_masks"):
        g.set_masks(torch.zeros(16, 16), torch.zeros(16, 16))
    with pytest.raises(ValueError, match="2 targets"):
        g.set_masks(torch.zeros(16, 16), torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="target_masks"):
        g.set_masks(torch.zeros(16, 16), torch.full((2, 16, 16), 2.0))
    with pytest.raises(ValueError, match="ref_mask"):
        g.set_masks(torch.full((16, 16), float("nan")), ok)
    with pytest.raises(ValueError, match="ref_mask"):
        g.set_masks(torch.full((16, 16), 255, dtype=torch.uint8), ok)
    with pytest.raises(TypeError, match="ref_mask"):
        g.set_masks(torch.zeros(16, 16, dtype=torch.complex64), ok)
    with pytest.raises(TypeError, match="target_masks"):
        g.set_masks(torch.zeros(16, 16), [[0, 1]])
    with pytest.raises(ValueError, match="ref_mask"):
        g.set_masks(torch.zeros(0, 16), ok)
    g.set_masks(torch.zeros(16, 16).numpy(), ok.to(torch.uint8))  # numpy and 0/1 ints are fine


def test_argument_validation():
    with pytest.raises(TypeError, match="config"):
        AttentionGraft({"fg_gain": 1.0}, BranchLayout(1))
    with pytest.raises(TypeError, match="layout"):
        AttentionGraft(GraftConfig.paper(), 3)
    with pytest.raises(TypeError, match="source_cache"):
        AttentionGraft(GraftConfig.paper(), BranchLayout(1), source_cache={})
    with pytest.raises(ValueError, match="source_cache"):
        AttentionGraft(GraftConfig.paper(), BranchLayout(1, include_sources=False))
    g = AttentionGraft(GraftConfig.paper(), BranchLayout(1))
    with pytest.raises(ValueError, match="step"):
        g.set_step(50, 50)
    with pytest.raises(ValueError, match="num_steps"):
        g.set_step(0, 0)
    with pytest.raises(ValueError, match="indices"):
        g.set_token_indices("crack")
    with pytest.raises(ValueError, match="indices"):
        g.set_token_indices([-1])
    g.set_token_indices(torch.tensor([3, 3, 1]))
    assert g._tokens == (1, 3)


def test_runtime_errors(tiny_unet):
    layout = BranchLayout(1)
    lat, emb = unet_inputs(layout)
    m = torch.ones(64, 64)
    g = AttentionGraft(GraftConfig.paper(), layout)
    with torch.no_grad():
        with g.installed(tiny_unet):
            with pytest.raises(RuntimeError, match="set_step"):
                tiny_unet(lat, 1, encoder_hidden_states=emb)
            g.set_step(0, 50)
            with pytest.raises(RuntimeError, match="set_masks"):
                tiny_unet(lat, 1, encoder_hidden_states=emb)
            g.set_masks(m, m[None])
            with pytest.raises(RuntimeError, match="rows"):
                tiny_unet(lat[:4], 1, encoder_hidden_states=emb[:4])
            g.set_step(25, 50)
            g.set_token_indices([77])
            with pytest.raises(ValueError, match="token indices"):
                tiny_unet(lat, 1, encoder_hidden_states=emb)
            with pytest.raises(RuntimeError, match="already installed"):
                with g.installed(tiny_unet):
                    pass
        assert not any(isinstance(p, GraftSelfAttnProcessor) for p in tiny_unet.attn_processors.values())
        with pytest.raises(ValueError, match="graft_layers"):
            with AttentionGraft(GraftConfig.paper(graft_layers=(16,)), layout).installed(tiny_unet):
                pass
        with pytest.raises(ValueError, match="graft_layer_names"):
            with AttentionGraft(GraftConfig.paper(graft_layer_names=("up_blocks.9.attn1",)),
                                layout).installed(tiny_unet):
                pass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rows_track_float32(dtype):
    gen = torch.Generator().manual_seed(8)
    layout = BranchLayout(2)
    torch.manual_seed(5)
    attn = Attention(query_dim=32, heads=2, dim_head=40).eval()
    x = torch.randn(layout.batch_size, 64, 32, generator=gen)
    ref, tgt = random_masks(2, 8, gen)
    g = make_graft(GraftConfig.paper(backend="torch"), layout, step=30, ref=ref, targets=tgt)
    proc = GraftSelfAttnProcessor(g, 12, "x.processor")
    with torch.no_grad():
        full = proc(attn, x)
        low = proc(attn.to(dtype), x.to(dtype))
    assert low.dtype == dtype and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), full, atol=3e-2, rtol=3e-2)


def test_layer_indices_follow_execution_order_with_sd15_names(tiny_unet):
    # the tiny UNet has SD v1.5's block config, so processor names are those of the real model;
    # the index must be the order in which the self-attentions actually run (down 0-5, mid 6, up 7-15)
    layers = transformer_layers(tiny_unet)
    expected = ([f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)]
                + ["mid_block.attentions.0"]
                + [f"up_blocks.{b}.attentions.{a}" for b in (1, 2, 3) for a in range(3)])
    assert [info.index for info in layers] == list(range(16))
    assert [info.self_name for info in layers] == [
        f"{e}.transformer_blocks.0.attn1.processor" for e in expected]
    assert [info.cross_name for info in layers] == [
        f"{e}.transformer_blocks.0.attn2.processor" for e in expected]
    modules = dict(tiny_unet.named_modules())
    ran = []
    hooks = [modules[info.self_name[: -len(".processor")]].register_forward_hook(
        lambda m, a, o, i=info.index: ran.append(i)) for info in layers]
    try:
        lat, emb = unet_inputs(BranchLayout(1))
        with torch.no_grad():
            tiny_unet(lat, 10, encoder_hidden_states=emb)
    finally:
        for h in hooks:
            h.remove()
    assert ran == list(range(16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dae_half_precision_stays_finite_and_tracks_float32(dtype):
    # DAE adds log(gain) to the anomaly tokens' logits instead of scaling probabilities by the gain
    # and renormalising, so even a huge gain cannot overflow fp16 (100 * p summed over 77 tokens is
    # fine, but 1e5 * p is not representable)
    gen = torch.Generator().manual_seed(11)
    layout = BranchLayout(2)
    torch.manual_seed(6)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=40).eval()
    x = torch.randn(layout.batch_size, 64, 32, generator=gen)
    enc = torch.randn(layout.batch_size, 77, 16, generator=gen)
    _, tgt = random_masks(2, 8, gen)
    g = make_graft(GraftConfig.paper(dae_gain=1e5), layout, step=25, ref=torch.ones(8, 8), targets=tgt)
    g.set_token_indices([3, 4])
    proc = GraftCrossAttnProcessor(g, 4, "x.processor")
    with torch.no_grad():
        full = proc(attn, x, encoder_hidden_states=enc)
        low = proc(attn.to(dtype), x.to(dtype), encoder_hidden_states=enc.to(dtype))
    assert low.dtype == dtype and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), full, atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------------------------
# coexistence with other processors, torch.compile
# ---------------------------------------------------------------------------------------------
class Recording(AttnProcessor2_0):
    """A custom processor (as LoRA-style adapters install) that counts its calls."""

    def __init__(self, log, name):
        super().__init__()
        self.log, self.name = log, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        self.log.append(self.name)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_other_processors_keep_running_where_nothing_is_grafted(tiny_unet):
    """Only the layers the config touches get a grafting processor; every other layer keeps its
    own (custom) processor, and a grafting processor hands idle calls to the one it replaced."""
    layout = BranchLayout(1)
    lat, emb = unet_inputs(layout, seed=6)
    before = dict(tiny_unet.attn_processors)
    log = []
    tiny_unet.set_attn_processor({name: Recording(log, name) for name in before})
    try:
        layers = transformer_layers(tiny_unet)
        grafted = {info.self_name for info in layers if info.index >= 9}
        cfg = GraftConfig.paper(qgraft_steps=None, dae_steps=None, graft_steps=(0.5, 1.0))
        g = AttentionGraft(cfg, layout)
        m = torch.zeros(64, 64)
        m[10:30, 10:30] = 1
        g.set_masks(m, m[None])
        with torch.no_grad(), g.installed(tiny_unet):
            procs = tiny_unet.attn_processors
            assert {n for n, p in procs.items() if isinstance(p, GraftSelfAttnProcessor)} == grafted
            assert not any(isinstance(p, GraftCrossAttnProcessor) for p in procs.values())
            g.set_step(10, 50)  # outside the TriAG window: every call reaches the custom processors
            tiny_unet(lat, 500, encoder_hidden_states=emb)
            assert sorted(log) == sorted(before)
            log.clear()
            g.set_step(30, 50)  # TriAG on layers 9-15: those self-attentions are grafted instead
            tiny_unet(lat, 500, encoder_hidden_states=emb)
            assert sorted(log) == sorted(set(before) - grafted)
        assert all(isinstance(p, Recording) for p in tiny_unet.attn_processors.values())
    finally:
        tiny_unet.set_attn_processor(before)


def test_ip_adapter_style_input_on_a_grafted_layer_is_a_clear_error():
    torch.manual_seed(3)
    layout = BranchLayout(2)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(layout.batch_size, 16, 32)
    enc = torch.randn(layout.batch_size, 77, 16)
    g = make_graft(GraftConfig.paper(), layout, step=25, ref=torch.ones(4, 4),
                   targets=torch.ones(2, 4, 4))
    g.set_token_indices([2])
    proc = GraftCrossAttnProcessor(g, 4, "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor")
    with pytest.raises(ValueError, match=r"up_blocks\.1\.attentions\.0.*IP-Adapter"):
        proc(attn, x, encoder_hidden_states=(enc, [torch.randn(layout.batch_size, 4, 16)]))
    g.set_step(45, 50)  # DAE idle: the call goes to the original processor, whatever it takes
    with pytest.raises(Exception) as info:
        proc(attn, x, encoder_hidden_states=(enc, []))
    assert "IP-Adapter" not in str(info.value)
    self_proc = GraftSelfAttnProcessor(g, 12, "mid.attn1.processor")
    g.set_step(25, 50)
    with pytest.raises(ValueError, match="mid.attn1.processor.*extra arguments"):
        self_proc(attn, x, scale=0.5)


def test_torch_compile_traces_each_phase_once():
    """A compiled UNet with grafting installed: no graph break, and one graph per phase of the
    schedule (Q graft, TriAG, TriAG + DAE; the TriAG steps after DAE reuse the TriAG graph) rather
    than one per layer or step. A 4-block UNet, the torch backend and Dynamo's eager backend keep
    it CPU-cheap; the Triton backend is one opaque custom op in the same place."""
    from torch._dynamo.utils import counters

    from o2mag.sources.tiny import tiny_unet

    unet = tiny_unet(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                     layers_per_block=1)
    assert len(transformer_layers(unet)) == 4
    layout = BranchLayout(2)
    lat, emb = unet_inputs(layout, size=16, seed=7)
    m = torch.zeros(128, 128)
    m[30:60, 40:80] = 1
    cfg = GraftConfig.paper(backend="torch", graft_layers=(2, 3), qgraft_layers=(0, 1, 2, 3),
                            dae_layers=(0, 1, 2, 3))
    g = AttentionGraft(cfg, layout)
    g.set_masks(m, torch.stack([m, m.flip(0)]))
    g.set_token_indices([3])
    steps = 10  # Q graft: step 0; TriAG: 1-3 and 8-9; TriAG + DAE: 4-7
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend="eager")
    eager = {}
    try:
        with torch.no_grad(), g.installed(unet):
            g.prepare((16, 16), "cpu", dtype=lat.dtype)
            for i in range(steps):
                g.set_step(i, steps)
                out = compiled(lat, 500, encoder_hidden_states=emb).sample
                if i in (0, 5):
                    eager[i] = (out, unet(lat, 500, encoder_hidden_states=emb).sample)
        graphs = counters["stats"]["unique_graphs"]
        breaks = dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert not breaks, breaks
    assert graphs == 3
    for got, want in eager.values():
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
