"""Per-block torch.compile of patched models: each block's forward compiles a bounded number of times, whatever the
depth, and the residual hand-over still fuses across the compiled regions.

Why: the hand-over between consecutive blocks once compared block indices, so dynamo guarded on a Python int that
differs per block and recompiled `fused_block_forward` for every block until `recompile_limit` (8); the blocks after
that silently ran eagerly. Here dynamo runs with `backend="eager"` on CPU (no Inductor build) and with
`fail_on_recompile_limit_hit`, so hitting the limit is an error instead of a silent fallback. A counting backend
records every graph dynamo hands over and how often each runs; the ops inside the graphs show whether the hand-over
happened: with it, a depth-N model runs exactly one plain norm + modulate (block 0's norm1) and 2N gated ones.
"""
import copy
from collections import Counter

import pytest
import torch
import torch._dynamo

from coredi_fast.models import create_jit_model, create_model
from coredi_kernels.patch import patch_dit, patch_jit
from test_sit_compat import randomize_

DEPTH = 28  # SiT-XL/2's depth: far past the recompile limit of 8


class GraphCounter:
    """A torch.compile backend that runs each graph eagerly and counts graphs, their runs and the coredi ops run."""

    def __init__(self):
        self.graphs = 0
        self.ops_run = Counter()  # coredi op name -> calls, summed over every run of every graph

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        ops = Counter(str(node.target) for node in gm.graph.nodes
                      if node.op == "call_function" and str(node.target).startswith("coredi."))

        def run(*args):
            self.ops_run.update(ops)
            return gm.forward(*args)

        return run


def compile_blocks(model, backend):
    for block in model.blocks:
        block.compile(backend=backend)
    return model


def forward_backward(model, inputs):
    """The output and every parameter's gradient of a fixed weighted sum of the output."""
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    weights = torch.linspace(-1, 2, out.numel()).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def sit(depth):
    return randomize_(create_model("SiT-Micro/2", input_size=8, num_classes=10, num_heads=4, depth=depth))


def sit_inputs(batch=2):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.rand(batch, generator=g),
            torch.randint(0, 10, (batch,), generator=g), torch.zeros(batch, dtype=torch.long))


def jit(depth):
    model = create_jit_model("JiT-Micro/2", input_size=8, in_channels=1, num_classes=10, depth=depth,
                             in_context_start=3)
    return randomize_(model)


def jit_inputs(batch=2):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(batch, 4, 4, 4, generator=g), torch.rand(batch, generator=g),
            torch.randint(0, 10, (batch,), generator=g), torch.zeros(batch, dtype=torch.long))


# name: (build(depth), inputs, patch, plain op, gated op, hand-overs that cannot happen by design)
MODELS = {
    "sit": (sit, sit_inputs, patch_dit, "coredi.layernorm_modulate_fwd",
            "coredi.gated_residual_layernorm_modulate_fwd", 0),
    # JiT: no hand-over into block in_context_start (class tokens are prepended there) nor into the final layer
    # (they are cut off again there).
    "jit": (jit, jit_inputs, patch_jit, "coredi.rmsnorm_modulate_fwd",
            "coredi.gated_residual_rmsnorm_modulate_fwd", 2),
}


# Graphs per grad mode, whatever the depth. SiT: the first block (nothing handed to it), the blocks in between, the
# last block (it hands over to the final layer). JiT, the same before and after the in-context insert (whose blocks
# see another sequence length): the block before the insert hands nothing over, the one after takes nothing.
GRAPHS = {"sit": 3, "jit": 6}


def compiled_run(name, depth, steps=2):
    build, inputs, patch, _, _, _ = MODELS[name]
    model = patch(build(depth))
    counter = GraphCounter()
    compile_blocks(model, counter)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        results = [forward_backward(model, inputs()) for _ in range(steps)]
    return model, counter, results


@pytest.mark.parametrize("name", MODELS)
def test_block_graphs_do_not_grow_with_depth(name):
    _, shallow, _ = compiled_run(name, depth=6, steps=1)
    _, deep, _ = compiled_run(name, depth=DEPTH, steps=1)
    assert deep.graphs == shallow.graphs == GRAPHS[name], (deep.graphs, shallow.graphs)


@pytest.mark.parametrize("name", MODELS)
def test_hand_over_fuses_across_compiled_blocks(name):
    _, _, _, plain, gated, breaks = MODELS[name]
    steps = 2
    _, counter, _ = compiled_run(name, DEPTH, steps=steps)
    # Each block fuses its inner residual add with norm2, and its last one with the next consumer's norm unless the
    # design forbids it (`breaks`). The only plain norms inside the compiled blocks: block 0's norm1, and in JiT the
    # norm1 of the block that sees the class tokens first (the final layer is not compiled per block).
    handed_over = DEPTH - breaks
    assert counter.ops_run[gated] == steps * (DEPTH + handed_over)
    assert counter.ops_run[plain] == steps * (1 + (breaks > 0))


@pytest.mark.parametrize("name", MODELS)
def test_compiled_patched_model_equals_unpatched(name):
    build, inputs, _, _, _, _ = MODELS[name]
    reference = build(DEPTH)
    want = forward_backward(copy.deepcopy(reference), inputs())
    torch.manual_seed(0)
    model, counter, results = compiled_run(name, DEPTH, steps=2)
    model.load_state_dict(reference.state_dict())
    got = forward_backward(model, inputs())
    (out, grads), (ref_out, ref_grads) = got, want
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    assert ref_out.abs().mean() > 1e-3
    assert grads.keys() == ref_grads.keys()
    for key, ref in ref_grads.items():
        torch.testing.assert_close(grads[key], ref, atol=2e-5, rtol=2e-5, msg=key)
