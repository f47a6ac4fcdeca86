"""GraphedEncoder: the frozen encoder's forward replayed as a CUDA graph. On the CPU it must be the encoder itself;
on a GPU (marked tests) every replay must equal an eager forward on the same input."""
import warnings

import pytest
import torch
from torch import nn

from coredi_fast.encoders import DINOv2Encoder
from coredi_fast.encoders.cuda_graph import GraphedEncoder

TINY_VIT = dict(embed_dim=64, depth=2, num_heads=4)


def _dino(device="cpu", dtype=None, img_size=28):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random init
        return DINOv2Encoder(weights=None, img_size=img_size, dtype=dtype, **TINY_VIT).to(device)


def _images(batch, seed, device="cpu", side=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, side, side), generator=g, dtype=torch.uint8).to(device)


def test_on_cpu_it_is_the_encoder_and_exposes_its_attributes():
    encoder = _dino()
    graphed = GraphedEncoder(encoder)
    images = _images(3, 0)
    assert torch.equal(graphed(images), encoder(images))
    assert graphed.graphs_captured == 0 and graphed.disabled_reason is None
    assert (graphed.embed_dim, graphed.num_tokens) == (encoder.embed_dim, encoder.num_tokens)
    graphed.train()
    assert not graphed.training and not encoder.training
    with pytest.raises(AttributeError, match="no_such_thing"):
        graphed.no_such_thing


@pytest.mark.parametrize("kwargs, name", [(dict(max_graphs=0), "max_graphs"), (dict(warmup=0), "warmup")])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GraphedEncoder(nn.Identity(), **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_replays_equal_eager_forwards_and_outputs_are_not_overwritten(dtype):
    encoder = _dino("cuda", dtype)
    graphed = GraphedEncoder(encoder, max_graphs=2)
    # The same kernels replayed; a tolerance only for a library picking another algorithm on the capture stream.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is None else dict(rtol=1e-2, atol=1e-2)
    first_in, second_in = _images(4, 1, "cuda"), _images(4, 2, "cuda")
    first = graphed(first_in)                  # capture + replay
    second = graphed(second_in)                # replay with new data
    assert graphed.graphs_captured == 1 and graphed.disabled_reason is None
    torch.testing.assert_close(first, encoder(first_in), **tol)
    torch.testing.assert_close(second, encoder(second_in), **tol)
    assert not torch.equal(first, second)      # the first result was cloned out, not overwritten by the replay

    odd = _images(3, 3, "cuda")                # the last, smaller batch of an epoch: a second graph
    torch.testing.assert_close(graphed(odd), encoder(odd), **tol)
    assert graphed.graphs_captured == 2
    third_shape = _images(2, 4, "cuda")        # beyond max_graphs: eager
    torch.testing.assert_close(graphed(third_shape), encoder(third_shape), **tol)
    assert graphed.graphs_captured == 2


class _SyncingEncoder(nn.Module):
    """Synchronizes with the host inside its forward (.item()), which a CUDA graph cannot capture."""

    def forward(self, x):
        scale = float(x.float().mean().item())
        return x.float() * scale


@pytest.mark.gpu
def test_a_failed_capture_falls_back_to_eager_and_says_why(caplog):
    graphed = GraphedEncoder(_SyncingEncoder())
    x = _images(2, 5, "cuda").float()
    with caplog.at_level("WARNING"):
        out = graphed(x)
    torch.testing.assert_close(out, _SyncingEncoder()(x))
    assert graphed.disabled_reason is not None and graphed.graphs_captured == 0
    assert "capture failed" in caplog.text
    torch.testing.assert_close(graphed(x), _SyncingEncoder()(x))   # and keeps working eagerly
