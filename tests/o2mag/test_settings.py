"""GenerationSettings: the generation keywords declared once, and every entry point built from them.

The public signatures must stay what they were before the settings object existed (diffusers-style
keywords, same kinds and defaults), every setting must reach every entry point with one default
and one check, and the command line must hand the pipeline exactly those settings."""
import argparse
import dataclasses
import inspect

import numpy as np
import pytest
import torch

from o2mag import GraftConfig
from o2mag.checks import is_int, is_number
from o2mag.pipeline import O2MAGPipeline
from o2mag.pipeline.settings import CALL, CHECK, STREAM, GenerationSettings

P = inspect.Parameter
INPUTS = [("self", P.POSITIONAL_OR_KEYWORD, P.empty), ("reference", P.POSITIONAL_OR_KEYWORD, P.empty),
          ("ref_mask", P.POSITIONAL_OR_KEYWORD, P.empty), ("normal", P.POSITIONAL_OR_KEYWORD, P.empty),
          ("target_masks", P.POSITIONAL_OR_KEYWORD, P.empty), ("prompt", P.POSITIONAL_OR_KEYWORD, None),
          ("anomaly_word", P.POSITIONAL_OR_KEYWORD, None)]
SETTINGS_AFTER_ETA = [("batch_size", 4), ("seed", 0), ("size", None), ("kv_cache", False), ("kv_cache_device", None),
                      ("blend_background", True), ("ago_steps", 500), ("ago_lr", 3e-3), ("ago_mask_weight", False),
                      ("ago_pooled", False), ("graft_config", None), ("scheme", "one_to_more"), ("cache_inversions_to_disk", False)]
# the signatures as they were written out by hand before GenerationSettings (names, kinds, defaults),
# plus the settings added since (ago_pooled)
BEFORE = {
    "__call__": INPUTS + [(n, P.POSITIONAL_OR_KEYWORD, d) for n, d in (
        ("num_inference_steps", 50), ("guidance_scale", 7.5), ("eta", 0.0), ("generator", None),
        ("output_type", "pil"), ("return_dict", True), ("callback_on_step_end", None),
        ("callback_on_step_end_tensor_inputs", ("latents",)))]
    + [(n, P.KEYWORD_ONLY, d) for n, d in SETTINGS_AFTER_ETA],
    "generate_iter": INPUTS + [(n, P.KEYWORD_ONLY, d) for n, d in (
        ("num_inference_steps", None), ("num_steps", None), ("guidance_scale", 7.5), ("eta", 0.0),
        ("generator", None), ("callback_on_step_end", None), ("callback_on_step_end_tensor_inputs", ("latents",)))]
    + [(n, P.KEYWORD_ONLY, d) for n, d in SETTINGS_AFTER_ETA],
}


def _shape(sig):
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("method", sorted(BEFORE))
def test_public_signatures_are_what_they_were(method):
    assert _shape(inspect.signature(getattr(O2MAGPipeline, method))) == BEFORE[method]


def test_check_inputs_takes_what_it_took_and_every_setting():
    shape = _shape(inspect.signature(O2MAGPipeline.check_inputs))
    positional = ["self", "prompt", "anomaly_word", "num_inference_steps", "guidance_scale", "eta", "generator",
                  "output_type", "callback_on_step_end", "callback_on_step_end_tensor_inputs"]
    assert [(n, k, d) for n, k, d in shape[:len(positional)]] == [(n, P.POSITIONAL_OR_KEYWORD, P.empty)
                                                                   for n in positional]
    assert shape[len(positional):] == [(n, P.KEYWORD_ONLY, d) for n, d in SETTINGS_AFTER_ETA]


def test_every_setting_has_one_default_everywhere():
    defaults = {f.name: f.default for f in dataclasses.fields(GenerationSettings)}
    for sig in (CALL, STREAM, CHECK):
        params = sig.parameters
        for name, default in defaults.items():
            assert name in params, name
            if params[name].default is not P.empty and name != "num_inference_steps":
                assert params[name].default == default, name
    assert GenerationSettings().keywords() == defaults
    assert CALL.parameters["num_inference_steps"].default == defaults["num_inference_steps"]


@pytest.mark.parametrize("bad, kind, match", [
    (dict(num_inference_steps=1), ValueError, "num_inference_steps must be >= 2"),
    (dict(batch_size=1.5), TypeError, "batch_size must be an int"),
    (dict(seed=True), TypeError, "seed must be an int"),
    (dict(guidance_scale=float("inf")), ValueError, "guidance_scale"),
    (dict(eta=-0.1), ValueError, "eta must be a number in"),
    (dict(ago_lr=0), ValueError, "ago_lr must be > 0"),
    (dict(scheme="nope"), ValueError, "scheme must be one of"),
    (dict(scheme="per_sample", kv_cache=True), ValueError, "kv_cache=True needs"),
    (dict(kv_cache_device="nowhere"), ValueError, "kv_cache_device"),
    (dict(size=0), ValueError, "size must be >= 1"),
    (dict(graft_config={}), TypeError, "graft_config must be"),
])
def test_settings_raise_what_the_pipeline_raises(pipe, bad, kind, match):
    with pytest.raises(kind, match=match) as built:
        GenerationSettings(**bad)
    with pytest.raises(kind) as called:
        pipe.generate_iter(np.zeros((32, 32, 3), np.uint8), np.ones((32, 32), bool), np.zeros((32, 32, 3), np.uint8),
                           [np.ones((32, 32), bool)], "a scratch", "scratch", **bad)
    assert str(called.value) == str(built.value)


def test_settings_are_normalised_and_frozen():
    s = GenerationSettings(num_inference_steps=np.int64(3), guidance_scale=1, batch_size=np.int32(2), ago_lr=1,
                           kv_cache=1, size=np.int64(64))
    assert type(s.num_inference_steps) is int and type(s.batch_size) is int and type(s.size) is int
    assert type(s.guidance_scale) is float and type(s.ago_lr) is float and s.kv_cache is True
    assert s.graft == GraftConfig.paper() and s.replace(seed=3).seed == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 1  # type: ignore[misc]


def test_the_first_bad_argument_is_the_one_named(pipe):
    # as before the settings object: the call options are checked between the settings' two groups
    args = (np.zeros((32, 32, 3), np.uint8), np.ones((32, 32), bool), np.zeros((32, 32, 3), np.uint8),
            [np.ones((32, 32), bool)], "a scratch", "scratch")
    with pytest.raises(TypeError, match="generator"):
        pipe.generate_iter(*args, generator=0, scheme="nope")
    with pytest.raises(ValueError, match="batch_size"):
        pipe.generate_iter(*args, generator=0, batch_size=0)
    with pytest.raises(ValueError, match="prompt is required"):
        pipe.check_inputs(None, "scratch", 0, 7.5, 0.0, None, "pil", None, ["latents"])
    pipe.check_inputs("a scratch", "scratch", 2, 7.5, 0.0, None, "pil", None, ["latents"], blend_background=False)


def test_a_call_that_does_not_fit_the_signature_names_the_method(pipe):
    with pytest.raises(TypeError, match=r"O2MAGPipeline.__call__\(\) got an unexpected keyword argument 'bogus'"):
        pipe(None, None, None, None, bogus=1)
    with pytest.raises(TypeError, match=r"O2MAGPipeline.generate_iter\(\) takes|O2MAGPipeline.generate_iter\(\) "):
        pipe.generate_iter(None, None, None, None, "p", "w", 50)  # everything after the inputs is keyword-only


def test_the_command_line_hands_the_pipeline_exactly_the_settings():
    from o2mag.commands import options

    args = argparse.Namespace(guidance=2.5, batch_size=3, seed=7, kv_cache=True, kv_cache_device="cpu", blend=False,
                              ago_lr=1e-3, ago_mask_weight=True, ago_pooled=False)
    s = options.generation_settings(args, steps=12, ago_steps=4, size=64)
    assert s == GenerationSettings(num_inference_steps=12, guidance_scale=2.5, batch_size=3, seed=7, size=64,
                                   kv_cache=True, kv_cache_device="cpu", blend_background=False, ago_steps=4,
                                   ago_lr=1e-3, ago_mask_weight=True, cache_inversions_to_disk=True)
    assert set(s.keywords()) == set(STREAM.parameters) - {"self", "reference", "ref_mask", "normal", "target_masks",
                                                          "prompt", "anomaly_word", "num_steps", "generator",
                                                          "callback_on_step_end",
                                                          "callback_on_step_end_tensor_inputs"}
    # the manifest keeps the command line's names, so folders written before resume
    assert options.manifest_settings(s) == dict(steps=12, guidance=2.5, ago_steps=4, ago_lr=1e-3,
                                                ago_mask_weight=True, size=64, blend_background=False, seed=7,
                                                graft="paper")
    # ago_pooled reaches the settings; the manifest names it only when on (older folders stay equal)
    pooled = options.generation_settings(argparse.Namespace(**{**vars(args), "ago_pooled": True}), steps=12,
                                         ago_steps=4, size=64, xl=True)
    assert pooled == s.replace(ago_pooled=True)
    assert options.manifest_settings(pooled) == {**options.manifest_settings(s), "ago_pooled": True}


@pytest.mark.parametrize("value, integer, number", [
    (3, True, True), (np.int64(3), True, True), (np.uint8(3), True, True), (3.0, False, True),
    (np.float32(3), False, True), (True, False, False), (np.bool_(True), False, False), ("3", False, False),
    (None, False, False), (torch.tensor(3), False, False),
])
def test_one_int_and_number_check(value, integer, number):
    assert is_int(value) is integer and is_number(value) is number


# the command's options that are generation settings accept exactly what pipe(...) accepts
_OPTION_VALUES = {"--steps": ("num_inference_steps", ["-1", "0", "1", "2", "3"]),
                  "--batch-size": ("batch_size", ["-1", "0", "1", "2"]),
                  "--ago-steps": ("ago_steps", ["-1", "0", "1"]),
                  "--seed": ("seed", ["-1", "0", "5"]),
                  "--guidance": ("guidance_scale", ["-1", "0", "1.5", "nan", "inf"]),
                  "--ago-lr": ("ago_lr", ["-1", "0", "1e-3", "nan"])}


@pytest.mark.parametrize("command", ["generate", "dataset"])
@pytest.mark.parametrize("option", sorted(_OPTION_VALUES))
def test_the_command_and_the_pipeline_share_one_rule(command, option):

    from o2mag.cli import build_parser
    from o2mag.commands import options
    from o2mag.errors import UsageError

    setting, values = _OPTION_VALUES[option]
    for text in values:
        value = (int if setting in ("num_inference_steps", "batch_size", "ago_steps", "seed") else float)(text)
        try:
            GenerationSettings(**{setting: value})
            api = True
        except (TypeError, ValueError):
            api = False
        try:
            args = build_parser().parse_args([command, f"{option}={text}"])
            steps = args.steps if args.steps is not None else 50
            ago_steps = args.ago_steps if args.ago_steps is not None else 500
            options.generation_settings(args, steps, ago_steps, None)
            cli = True
        except SystemExit:  # argparse's own bound
            cli = False
        except UsageError as e:
            assert str(e).startswith(option), e  # the error names the option
            cli = False
        assert cli == api, (option, text, cli, api)
