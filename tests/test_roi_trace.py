"""The ROI ops under graph capture: ``torch.fx.symbolic_trace`` records each op as one call (as
torchvision's ``RoIAlign`` module does, and from any calling module), ``torch.export`` keeps the
registered custom ops, ``torch.compile(fullgraph=True)`` does not break the graph, and every traced
module gives the eager result, forward and backward."""
from __future__ import annotations

import pytest
import torch
from roi_helpers import random_rois, require

from regionmed_fast.nn import RoIPoolFuse
from regionmed_fast.ops import roi_align, roi_pool_fuse
from regionmed_fast.testing import assert_close

# Triton is traced on a GPU only: the interpreter adds a minute for nothing these tests look at.
TRACED = ["cpp", pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("triton", marks=pytest.mark.gpu)]


class Head(torch.nn.Module):
    """A detector-style head: the fused op through its module, and the functional roi_align."""

    def __init__(self, backend: str, channels: int = 4):
        super().__init__()
        self.backend = backend
        self.pool = RoIPoolFuse(channels, output_size=2, sampling_ratio=2, aligned=True, layout="nhwc",
                                backend=backend)
        with torch.no_grad():
            self.pool.gate_weight.normal_()

    def forward(self, tokens, rois, glob):
        z = self.pool(tokens, rois, glob, grid_size=(5, 6))
        bins = roi_align(tokens, rois, (2, 3), 1.0, -1, False, "nhwc", grid_size=(5, 6), backend=self.backend)
        return z, bins


def _inputs(device: str):
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randn(2, 30, 4, generator=gen).to(device)
    rois = random_rois(5, 2, 5, 6, 1.0, gen, device=device)
    glob = torch.randn(2, 4, generator=gen).to(device)
    return tokens, rois, glob


def _outputs_and_grads(module, tokens, rois, glob):
    t = tokens.detach().clone().requires_grad_(True)
    g = glob.detach().clone().requires_grad_(True)
    z, bins = module(t, rois, g)
    loss = (z * torch.linspace(-1, 1, z.numel(), device=z.device).view_as(z)).sum() + bins.square().sum()
    grads = torch.autograd.grad(loss, [t, g, module.pool.gate_weight, module.pool.gate_bias])
    return (z, bins, *grads)


def _same(traced, eager, name):
    for i, (a, e) in enumerate(zip(traced, eager)):
        assert_close(a, e, name=f"{name} output/grad {i}")


@pytest.mark.parametrize("name", TRACED)
def test_fx_symbolic_trace_records_each_op_once(name):
    dev = require(name)
    head = Head(name).to(dev)
    gm = torch.fx.symbolic_trace(head)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls.count(roi_pool_fuse) == 1 and calls.count(roi_align) == 1, gm.graph
    # nothing of the ops' insides leaked into the graph: only the gate's dtype casts besides them
    assert set(calls) <= {roi_pool_fuse, roi_align, getattr}, calls
    _same(_outputs_and_grads(gm, *_inputs(dev)), _outputs_and_grads(head, *_inputs(dev)), "fx")


def test_fx_trace_of_a_list_of_boxes():
    """Per-image box lists are traced too (the list is one traced input)."""
    require("cpp")

    def f(features, boxes):
        return roi_align(features, boxes, 2, 0.5, 2, True, backend="cpp")

    gm = torch.fx.symbolic_trace(f)
    feats = torch.randn(2, 3, 8, 8)
    boxes = [torch.tensor([[0.0, 0.0, 9.0, 7.0]]), torch.tensor([[2.0, 1.0, 12.0, 15.0], [3.0, 3.0, 4.0, 4.0]])]
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [roi_align]
    assert torch.equal(gm(feats, boxes), f(feats, boxes))


@pytest.mark.parametrize("name", TRACED)
@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_keeps_the_custom_ops(name, strict):
    dev = require(name)
    head = Head(name).to(dev)
    ep = torch.export.export(head, _inputs(dev), strict=strict)
    calls = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.regionmed_fast.roi_pool_fuse.default) == 1, calls
    assert calls.count(torch.ops.regionmed_fast.roi_align.default) == 1, calls
    z, bins = ep.module()(*_inputs(dev))
    z_e, bins_e = head(*_inputs(dev))
    assert_close(z, z_e, name="export z")
    assert_close(bins, bins_e, name="export roi_align")


@pytest.mark.parametrize("name", TRACED)
def test_torch_export_gradients(name):
    """The exported program differentiates like the eager module (custom-op autograd)."""
    dev = require(name)
    head = Head(name).to(dev)
    tokens, rois, glob = _inputs(dev)
    ep = torch.export.export(head, (tokens, rois, glob))
    exported = ep.module()
    t = tokens.clone().requires_grad_(True)
    z, bins = exported(t, rois, glob)
    (gt,) = torch.autograd.grad(z.sum() + bins.square().sum(), t)
    t2 = tokens.clone().requires_grad_(True)
    z2, bins2 = head(t2, rois, glob)
    (gt2,) = torch.autograd.grad(z2.sum() + bins2.square().sum(), t2)
    assert_close(gt, gt2, name="export grad")


@pytest.mark.parametrize("name", TRACED)
def test_torch_compile_fullgraph(name):
    dev = require(name)
    torch._dynamo.reset()
    head = Head(name).to(dev)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    _same(_outputs_and_grads(compiled, *_inputs(dev)), _outputs_and_grads(head, *_inputs(dev)), "compiled")
