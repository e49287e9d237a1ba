"""GraftConfig owns every window and gain; the paper preset reproduces the authors' schedule."""
import dataclasses
import json

import pytest

from o2mag import GraftConfig
from o2mag.graft import transformer_layers
from o2mag.sources.tiny import tiny_unet


def _modes(cfg, num_steps, names=None):
    names = names or {i: f"layer{i}.processor" for i in range(16)}
    table = {}
    for step in range(num_steps):
        plan = cfg.plan(step, num_steps)
        table[step] = {i: cfg.self_mode(plan, i, names[i]) for i in range(16)}
    return table


def test_paper_windows_for_50_steps():
    cfg = GraftConfig.paper()
    assert cfg == GraftConfig()
    table = _modes(cfg, 50)
    for step in range(5):
        assert set(table[step].values()) == {"qgraft"}, step
    for step in range(5, 50):
        assert [i for i, m in table[step].items() if m == "graft"] == list(range(9, 16))
        assert all(table[step][i] is None for i in range(9))
    dae = [s for s in range(50) if cfg.plan(s, 50).dae]
    assert dae == list(range(20, 40))
    assert all(cfg.dae_on(cfg.plan(25, 50), i) for i in range(16))
    assert cfg.fg_gain == pytest.approx(1 / 0.7)
    assert all(cfg.plan(s, 50).fg_gain == pytest.approx(1 / 0.7) for s in range(5, 50))
    sched = cfg.schedule(50)
    assert sched["qgraft"] == list(range(5)) and sched["dae"] == list(range(20, 40))
    assert (cfg.exclude_target_from_background, cfg.target_mask_mode, cfg.reference_mask_mode,
            cfg.exclusion_mask_mode, cfg.qgraft_mask_mode, cfg.dae_gain, cfg.dae_cond_only) == (
        True, "max", "max", "nearest", "nearest", 100.0, True)


def test_windows_scale_with_num_steps_and_accept_step_indices():
    cfg = GraftConfig.paper()
    assert list(cfg.step_range(cfg.qgraft_steps, 20)) == [0, 1]
    assert list(cfg.step_range(cfg.graft_steps, 20)) == list(range(2, 20))
    assert list(cfg.step_range(cfg.dae_steps, 20)) == list(range(8, 16))
    assert list(cfg.step_range(cfg.dae_steps, 1)) == []
    fixed = cfg.replace(graft_steps=(5, 50), qgraft_steps=None)
    assert list(fixed.step_range(fixed.graft_steps, 30)) == list(range(5, 30))
    assert _modes(fixed, 30)[3][12] is None and _modes(fixed, 30)[5][12] == "graft"
    gated = cfg.replace(fg_gain_steps=(0.4, 0.8))
    assert gated.plan(10, 50).fg_gain == 1.0 and gated.plan(20, 50).fg_gain == pytest.approx(1 / 0.7)


def test_layer_selection_by_processor_name():
    unet = tiny_unet()
    names = {info.index: info.self_name for info in transformer_layers(unet)}
    cfg = GraftConfig.paper(graft_layers=(), qgraft_steps=None,
                            graft_layer_names=(names[3][: -len(".processor")], names[7]))
    assert cfg.graft_layer_names == (names[3], names[7])
    grafted = [i for i, m in _modes(cfg, 50, names)[30].items() if m == "graft"]
    assert grafted == [3, 7]


def test_disabled_turns_everything_off():
    cfg = GraftConfig.disabled()
    for step in range(10):
        plan = cfg.plan(step, 10)
        assert not (plan.qgraft or plan.graft or plan.dae) and plan.fg_gain == 1.0
    assert all(m is None for row in _modes(cfg, 10).values() for m in row.values())


def test_frozen_and_serialisable():
    cfg = GraftConfig.paper()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.fg_gain = 2.0
    assert json.loads(json.dumps(cfg.to_dict()))["graft_layers"] == list(range(9, 16))
    assert GraftConfig(graft_layers=[15, 9]).graft_layers == (9, 15)


@pytest.mark.parametrize("field, value", [
    ("graft_layers", (1, -1)), ("graft_layers", (2, 2)), ("graft_layers", "9"), ("qgraft_layers", (1.0,)),
    ("dae_layers", (True,)), ("graft_layer_names", ("",)), ("graft_layer_names", "up_blocks"),
    ("graft_steps", (0.5, 0.2)), ("graft_steps", (0.1, 1.5)), ("graft_steps", (1, 0.5)),
    ("graft_steps", (5,)), ("qgraft_steps", (-1, 3)), ("dae_steps", (float("nan"), 0.5)),
    ("fg_gain_steps", "all"), ("fg_gain", 0.0), ("fg_gain", float("inf")), ("fg_gain", True),
    ("dae_gain", -100.0), ("exclude_target_from_background", 1), ("fg_gain_in_qgraft", None),
    ("dae_cond_only", "yes"), ("target_mask_mode", "bilinear"), ("reference_mask_mode", None),
    ("exclusion_mask_mode", "MAX"), ("qgraft_mask_mode", ""), ("dae_mask_mode", "avg"),
    ("backend", "cuda"),
])
def test_bad_fields_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GraftConfig(**{field: value})


def test_bad_step_arguments():
    cfg = GraftConfig.paper()
    with pytest.raises(ValueError, match="step"):
        cfg.plan(50, 50)
    with pytest.raises(ValueError, match="step"):
        cfg.plan(-1, 50)
    with pytest.raises(ValueError, match="num_steps"):
        cfg.plan(0, 0)
    with pytest.raises(ValueError, match="num_steps"):
        cfg.step_range((0.1, 0.2), 2.5)


def _tokens_per_layer(unet, added=None):
    """Each self-attention's token count, by execution-order index, from one forward pass."""
    import torch

    seen = {}
    hooks = [unet.get_submodule(info.self_name[: -len(".processor")]).register_forward_hook(
        lambda m, args, kw, out, i=info.index: seen.setdefault(i, args[0].shape[1]), with_kwargs=True)
        for info in transformer_layers(unet)]
    try:
        size = unet.config.sample_size
        with torch.no_grad():
            unet(torch.zeros(1, 4, size, size), 1,
                 encoder_hidden_states=torch.zeros(1, 3, unet.config.cross_attention_dim),
                 added_cond_kwargs=added)
    finally:
        for h in hooks:
            h.remove()
    return seen, size


def test_positional_rule_on_an_sd15_unet_gives_the_papers_layers():
    from o2mag.method.levels import attention_levels

    unet = tiny_unet()
    cfg = GraftConfig.for_unet(unet)
    assert cfg == GraftConfig.paper()
    assert cfg.describe_layers() == "TriAG 9-15; Q graft 0-15; DAE 0-15"
    assert GraftConfig.for_unet(unet, fg_gain=2.0) == GraftConfig.paper(fg_gain=2.0)
    # the levels' factors are the resolutions the blocks really run at
    tokens, size = _tokens_per_layer(unet)
    for level in attention_levels(unet):
        for i in level.layers:
            assert tokens[i] == (size // level.factor) ** 2, (level, i)


def test_positional_rule_on_sd2_and_sdxl_layouts():
    import torch

    from o2mag.method.levels import attention_levels
    from o2mag.sources.tiny import tiny_sdxl_unet_config

    sd2 = tiny_unet(seed=1, block_out_channels=(64, 128, 128, 128), attention_head_dim=(1, 2, 2, 2),
                    use_linear_projection=True)
    assert GraftConfig.for_unet(sd2) == GraftConfig.paper()
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    xl = UNet2DConditionModel(**tiny_sdxl_unet_config()).eval()
    layers = transformer_layers(xl)
    assert len(layers) == 70
    cfg = GraftConfig.for_unet(xl)
    assert cfg.graft_layers == tuple(range(54, 70))
    assert cfg.qgraft_layers == cfg.dae_layers == tuple(range(70))
    assert cfg.describe_layers() == "TriAG 54-69; Q graft 0-69; DAE 0-69"
    levels = attention_levels(xl)
    assert [(lv.part, lv.factor, len(lv.layers)) for lv in levels] == [
        ("down", 2, 4), ("down", 4, 20), ("mid", 4, 10), ("up", 4, 30), ("up", 2, 6)]
    tokens, size = _tokens_per_layer(xl, added=dict(
        text_embeds=torch.zeros(1, xl.config.projection_class_embeddings_input_dim - 48),
        time_ids=torch.zeros(1, 6)))
    for level in levels:
        assert all(tokens[i] == (size // level.factor) ** 2 for i in level.layers), level


def test_positional_rule_refuses_a_unet_without_attention():
    from diffusers import UNet2DConditionModel

    plain = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32), layers_per_block=1,
                                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                 mid_block_type=None, cross_attention_dim=8)
    with pytest.raises(ValueError, match="no transformer blocks"):
        GraftConfig.for_unet(plain)
