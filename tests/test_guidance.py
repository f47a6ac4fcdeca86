"""Guidance wrappers against a fake network whose outputs are known closed-form functions of (x, t, y)."""
import pytest
import torch

from coredi_fast.transport import (cfg_model_fn, make_model_fn, representation_guidance_model_fn, sample_ode,
                                   velocity_from_x_prediction)

IMAGE_CHANNELS, FEATURE_CHANNELS, NULL_CLASS = 2, 3, 10


def closed_form(x, t, y):
    """out[b, c] = x[b, c] (1 + 0.1 y_b) + (c + 1) t_b + 0.5 * sum of x's feature channels (broadcast to all c).

    Depends on the label (so CFG changes it), on t and on the feature INPUT channels (so RG changes it).
    """
    c = torch.arange(x.shape[1], dtype=x.dtype).view(1, -1, *([1] * (x.ndim - 2)))
    tb = t.view(-1, *([1] * (x.ndim - 1)))
    yb = y.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return x * (1 + 0.1 * yb) + (c + 1) * tb + 0.5 * x[:, IMAGE_CHANNELS:].sum(dim=1, keepdim=True)


class FakeModel:
    """closed_form as a model(x, t, y), recording every call's inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        return closed_form(x, t, y)


def _inputs(batch=4):
    x = torch.randn(batch, IMAGE_CHANNELS + FEATURE_CHANNELS, 3, 3, dtype=torch.float64)
    t = torch.linspace(0.1, 0.8, batch, dtype=torch.float64)
    y = torch.arange(batch) % NULL_CLASS
    return x, t, y


def _assert_one_batched_call(model, x, t, second_x, second_y):
    assert len(model.calls) == 1
    x_in, t_in, y_in = model.calls[0]
    B = x.shape[0]
    assert x_in.shape[0] == 2 * B
    torch.testing.assert_close(x_in[:B], x)
    torch.testing.assert_close(x_in[B:], second_x)
    torch.testing.assert_close(t_in, torch.cat([t, t]))
    torch.testing.assert_close(y_in[B:], second_y)


#################################################################################
#                           Classifier-free guidance                            #
#################################################################################

def test_cfg_image_only_guides_image_channels_and_keeps_conditional_features():
    x, t, y = _inputs()
    model, w = FakeModel(), 2.5
    v = cfg_model_fn(model, y, w, NULL_CLASS, IMAGE_CHANNELS, apply_to="image")(x, t)
    v_c, v_u = closed_form(x, t, y), closed_form(x, t, torch.full_like(y, NULL_CLASS))
    torch.testing.assert_close(v[:, :IMAGE_CHANNELS], v_u[:, :IMAGE_CHANNELS] + w * (v_c - v_u)[:, :IMAGE_CHANNELS])
    torch.testing.assert_close(v[:, IMAGE_CHANNELS:], v_c[:, IMAGE_CHANNELS:])
    assert (v_c - v_u)[:, IMAGE_CHANNELS:].abs().min() > 0  # the features would have changed under guidance
    _assert_one_batched_call(model, x, t, second_x=x, second_y=torch.full_like(y, NULL_CLASS))


def test_cfg_all_channels():
    x, t, y = _inputs()
    model, w = FakeModel(), 1.7
    v = cfg_model_fn(model, y, w, NULL_CLASS, IMAGE_CHANNELS, apply_to="all")(x, t)
    v_c, v_u = closed_form(x, t, y), closed_form(x, t, torch.full_like(y, NULL_CLASS))
    torch.testing.assert_close(v, v_u + w * (v_c - v_u))
    _assert_one_batched_call(model, x, t, second_x=x, second_y=torch.full_like(y, NULL_CLASS))


def test_cfg_interval_switches_per_sample():
    x, _, y = _inputs()
    t = torch.tensor([0.05, 0.1, 0.6, 0.95], dtype=torch.float64)
    model, w = FakeModel(), 3.0
    v = cfg_model_fn(model, y, w, NULL_CLASS, IMAGE_CHANNELS, apply_to="all", interval=(0.1, 0.6))(x, t)
    v_c, v_u = closed_form(x, t, y), closed_form(x, t, torch.full_like(y, NULL_CLASS))
    guided = v_u + w * (v_c - v_u)
    torch.testing.assert_close(v[[1, 2]], guided[[1, 2]])  # low <= t <= high, both bounds included
    torch.testing.assert_close(v[[0, 3]], v_c[[0, 3]])
    assert len(model.calls) == 1


def test_cfg_outside_interval_or_scale_one_uses_one_plain_pass():
    x, t, y = _inputs()
    for scale, interval in ((1.0, None), (4.0, (0.9, 1.0))):
        model = FakeModel()
        v = cfg_model_fn(model, y, scale, NULL_CLASS, IMAGE_CHANNELS, interval=interval)(x, t)
        torch.testing.assert_close(v, closed_form(x, t, y))
        assert len(model.calls) == 1 and model.calls[0][0].shape[0] == x.shape[0]


#################################################################################
#                           Representation guidance                             #
#################################################################################

def test_representation_guidance_formula_and_zeroed_feature_input():
    x, t, y = _inputs()
    model, w = FakeModel(), 1.3
    v = representation_guidance_model_fn(model, y, w, IMAGE_CHANNELS)(x, t)
    x_no_features = x.clone()
    x_no_features[:, IMAGE_CHANNELS:] = 0
    v_joint, v_image_only = closed_form(x, t, y), closed_form(x_no_features, t, y)
    torch.testing.assert_close(v, v_image_only + w * (v_joint - v_image_only))
    # the second half of the single batched pass: image channels intact, feature channels exactly 0, same labels
    _assert_one_batched_call(model, x, t, second_x=x_no_features, second_y=y)
    assert torch.equal(model.calls[0][0][x.shape[0]:, IMAGE_CHANNELS:], torch.zeros_like(x[:, IMAGE_CHANNELS:]))


def test_representation_guidance_needs_feature_channels():
    x, t, y = _inputs()
    fn = representation_guidance_model_fn(FakeModel(), y, 1.5, image_channels=x.shape[1])
    with pytest.raises(ValueError, match="feature channels"):
        fn(x, t)


#################################################################################
#                                 make_model_fn                                 #
#################################################################################

def test_make_model_fn_dispatches():
    x, t, y = _inputs()
    plain = make_model_fn(FakeModel(), y, image_channels=IMAGE_CHANNELS)(x, t)
    torch.testing.assert_close(plain, closed_form(x, t, y))
    cfg = make_model_fn(FakeModel(), y, cfg_scale=2.0, guidance_on="all", image_channels=IMAGE_CHANNELS,
                        null_class=NULL_CLASS)(x, t)
    torch.testing.assert_close(cfg, cfg_model_fn(FakeModel(), y, 2.0, NULL_CLASS, IMAGE_CHANNELS, "all")(x, t))
    rg = make_model_fn(FakeModel(), y, rg_scale=1.5, image_channels=IMAGE_CHANNELS)(x, t)
    torch.testing.assert_close(rg, representation_guidance_model_fn(FakeModel(), y, 1.5, IMAGE_CHANNELS)(x, t))


def test_x_prediction_guidance_equals_velocity_space_guidance():
    """Guidance is affine with the same offset in both branches: guide x_pred then convert == convert then guide."""
    x, _, y = _inputs()
    t = torch.tensor([0.0, 0.4, 0.9, 0.99], dtype=torch.float64)  # 0.99 exercises the clamp
    w, clamp = 2.0, 0.05
    v = make_model_fn(FakeModel(), y, cfg_scale=w, image_channels=IMAGE_CHANNELS, null_class=NULL_CLASS,
                      prediction="x", x_pred_clamp=clamp)(x, t)
    one_minus_t = (1 - t).clamp_min(clamp).view(-1, 1, 1, 1)
    v_c = (closed_form(x, t, y) - x) / one_minus_t
    v_u = (closed_form(x, t, torch.full_like(y, NULL_CLASS)) - x) / one_minus_t
    expected = torch.cat([(v_u + w * (v_c - v_u))[:, :IMAGE_CHANNELS], v_c[:, IMAGE_CHANNELS:]], dim=1)
    torch.testing.assert_close(v, expected)
    torch.testing.assert_close(v_c, velocity_from_x_prediction(closed_form(x, t, y), x, t, clamp))


def test_guided_model_fn_drives_a_sampler():
    """A CFG model_fn plugs into sample_ode: one 2B forward per step, and the result matches a hand-rolled Euler."""
    x, _, y = _inputs()
    model, w = FakeModel(), 1.5
    out = sample_ode(make_model_fn(model, y, cfg_scale=w, image_channels=IMAGE_CHANNELS, null_class=NULL_CLASS),
                     x, steps=3, method="euler")
    assert len(model.calls) == 3 and all(call[0].shape[0] == 2 * x.shape[0] for call in model.calls)
    state = x
    for t0 in (0.0, 1 / 3, 2 / 3):
        t = torch.full((x.shape[0],), t0, dtype=torch.float64)
        v_c, v_u = closed_form(state, t, y), closed_form(state, t, torch.full_like(y, NULL_CLASS))
        v = torch.cat([(v_u + w * (v_c - v_u))[:, :IMAGE_CHANNELS], v_c[:, IMAGE_CHANNELS:]], dim=1)
        state = state + v / 3
    torch.testing.assert_close(out, state)


@pytest.mark.parametrize("kwargs, name", [
    (dict(cfg_scale=2.0, rg_scale=1.5, null_class=NULL_CLASS), "rg_scale"),
    (dict(cfg_scale=2.0), "null_class"),
    (dict(guidance_on="features"), "guidance_on"),
    (dict(prediction="eps"), "prediction"),
    (dict(guidance_interval=(0.8, 0.2)), "interval"),
    (dict(image_channels=0), "image_channels"),
])
def test_make_model_fn_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_model_fn(FakeModel(), torch.zeros(2, dtype=torch.long), **kwargs)


def test_label_batch_mismatch_is_reported():
    x, t, _ = _inputs()
    fn = cfg_model_fn(FakeModel(), torch.zeros(3, dtype=torch.long), 2.0, NULL_CLASS, IMAGE_CHANNELS)
    with pytest.raises(ValueError, match="labels"):
        fn(x, t)


def test_representation_guidance_on_x_prediction_blends_the_converted_branches():
    """RG's image-only branch sees zeroed feature channels: each branch converts x_hat with its OWN input, then the
    velocities blend (JiT's _forward_sample order). Blending x_hat first and converting with the joint input differs
    on the feature channels."""
    x, _, y = _inputs()
    t = torch.tensor([0.0, 0.4, 0.9, 0.99], dtype=torch.float64)
    w, clamp = 1.7, 0.05
    v = make_model_fn(FakeModel(), y, rg_scale=w, image_channels=IMAGE_CHANNELS, prediction="x",
                      x_pred_clamp=clamp)(x, t)
    x_zeroed = torch.cat([x[:, :IMAGE_CHANNELS], torch.zeros_like(x[:, IMAGE_CHANNELS:])], dim=1)
    one_minus_t = (1 - t).clamp_min(clamp).view(-1, 1, 1, 1)
    v_joint = (closed_form(x, t, y) - x) / one_minus_t
    v_image_only = (closed_form(x_zeroed, t, y) - x_zeroed) / one_minus_t
    torch.testing.assert_close(v, v_image_only + w * (v_joint - v_image_only))
    guided_x_hat = closed_form(x_zeroed, t, y) + w * (closed_form(x, t, y) - closed_form(x_zeroed, t, y))
    converted_after = (guided_x_hat - x) / one_minus_t
    torch.testing.assert_close(v[:, :IMAGE_CHANNELS], converted_after[:, :IMAGE_CHANNELS])  # same input there
    assert (v[:, IMAGE_CHANNELS:] - converted_after[:, IMAGE_CHANNELS:]).abs().max() > 0.1
