"""Deploy-time re-parameterisation: BN folded, three branches merged into one M×M kernel per block, exactly."""
import warnings

import pytest
import torch

from reference_impl import randomize_bn_and_scales
from slak_mm.models import SLaK
from slak_mm.models.checkpoint import CheckpointError
from slak_mm.models.layers import LargeKernelConv, fuse_bn


@pytest.mark.parametrize('arch,ks', [('tiny', [51, 49, 47, 13, 5]), ('small', [51, 49, 47, 13, 5]),
                                     ('base', [51, 49, 47, 13, 5]), (dict(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8]),
                                                                      [31, 29, 27, 13, 3])])
def test_deployed_backbone_matches_training_form(arch, ks):
    torch.manual_seed(0)
    model = SLaK(arch, kernel_size=ks).eval()
    randomize_bn_and_scales(model)
    x = torch.randn(1, 3, 96, 160)  # non-square; stage maps 24x40 .. 3x5 are all smaller than the kernels
    with torch.no_grad():
        before = model(x)
        model.switch_to_deploy()
        after = model(x)
    assert model.deploy and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for a, b in zip(before, after):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_dense_layout_deploys_exactly():
    torch.manual_seed(0)
    model = SLaK(dict(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8]), kernel_size=[13, 11, 9, 7, 3],
                 kernel_layout='dense').eval()
    randomize_bn_and_scales(model)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        before = model(x)
        model.switch_to_deploy()
        after = model(x)
    for a, b in zip(before, after):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_merged_kernel_is_the_centred_cross_and_keeps_sparse_zeros():
    torch.manual_seed(0)
    lk = LargeKernelConv(4, 11, 3, dict(type='BN')).eval()
    randomize_bn_and_scales(lk)
    with torch.no_grad():
        for br in (lk.tall, lk.wide, lk.small):
            br.conv.weight.mul_((torch.rand_like(br.conv.weight) > 0.4).float())  # 40% exact zeros
    kernel, bias = lk.merged_kernel_bias()
    assert kernel.shape == (4, 1, 11, 11)
    # independent expectation: BN folded per branch, zero-padded to 11x11, summed
    exp = torch.zeros(4, 1, 11, 11)
    exp_b = torch.zeros(4)
    for br, (r0, c0) in ((lk.tall, (0, 4)), (lk.wide, (4, 0)), (lk.small, (4, 4))):
        s = br.bn.weight / (br.bn.running_var + br.bn.eps).sqrt()
        kh, kw = br.conv.weight.shape[2:]
        exp[:, :, r0:r0 + kh, c0:c0 + kw] += br.conv.weight * s[:, None, None, None]
        exp_b += br.bn.bias - br.bn.running_mean * s
    torch.testing.assert_close(kernel, exp)
    torch.testing.assert_close(bias, exp_b)
    outside = kernel.clone()
    outside[:, :, 4:7, :] = 0
    outside[:, :, :, 4:7] = 0
    assert not outside.any()  # zero outside the cross
    # outside the overlap only the tall branch contributes: its exact zeros stay exact zeros
    assert torch.equal(kernel[:, 0, :4, 4:7] == 0, lk.tall.conv.weight[:, 0, :4, :] == 0)
    assert (kernel[:, 0, :4, 4:7] == 0).any()


def test_switch_to_deploy_twice_is_a_noop_and_training_mode_raises():
    model = SLaK(dict(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8]), kernel_size=[13, 11, 9, 7, 3])
    with pytest.raises(RuntimeError, match='eval'):
        model.switch_to_deploy()
    model.eval().switch_to_deploy()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.switch_to_deploy()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())


def test_deployed_checkpoint_and_training_form_are_not_interchangeable(tmp_path):
    arch, ks = dict(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8]), [13, 11, 9, 7, 3]
    model = SLaK(arch, kernel_size=ks).eval()
    train_path = tmp_path / 'train.pth'
    torch.save({'state_dict': model.state_dict()}, train_path)
    model.switch_to_deploy()
    dep_path = tmp_path / 'deploy.pth'
    torch.save({'state_dict': model.state_dict()}, dep_path)
    into_train = SLaK(arch, kernel_size=ks, init_cfg=dict(type='Pretrained', checkpoint=str(dep_path)))
    with pytest.raises(CheckpointError, match='deploy=True'):
        into_train.init_weights()
    into_deploy = SLaK(arch, kernel_size=ks, deploy=True, init_cfg=dict(type='Pretrained', checkpoint=str(train_path)))
    with pytest.raises(CheckpointError, match='decomposed.*deploy=False'):
        into_deploy.init_weights()
    ok = SLaK(arch, kernel_size=ks, deploy=True, init_cfg=dict(type='Pretrained', checkpoint=str(dep_path))).eval()
    ok.init_weights()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(ok(x), model(x)):
            torch.testing.assert_close(a, b)


def test_fuse_bn_matches_eval_bn():
    conv = torch.nn.Conv2d(3, 3, (5, 3), padding=(2, 1), groups=3, bias=False)
    bn = torch.nn.BatchNorm2d(3).eval()
    randomize_bn_and_scales(bn)
    k, b = fuse_bn(conv.weight, bn)
    x = torch.randn(1, 3, 9, 9)
    y = torch.nn.functional.conv2d(x, k, b, padding=(2, 1), groups=3)
    torch.testing.assert_close(y, bn(conv(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('layout', ['decomposed', 'dense'])
def test_eval_mode_runs_bn_folded_and_matches_branchwise(layout):
    """In eval mode the module folds its BNs on the fly (two band convs instead of three conv+BN branches). The
    branch-wise computation of the same module (forced by a forward hook on a branch, which must disable folding so
    hook-based tools such as the FLOP counter still see every conv) gives the same output and gradients."""
    torch.manual_seed(0)
    m = LargeKernelConv(8, 13, 3, dict(type='BN'), layout=layout)
    for b in m.branches():
        b.bn.running_mean.normal_()
        b.bn.running_var.uniform_(0.5, 2)
        b.bn.weight.data.normal_()
        b.bn.bias.data.normal_()
    m.eval()
    x = torch.randn(2, 8, 9, 11).contiguous(memory_format=torch.channels_last)
    calls = []
    x1 = x.clone().requires_grad_()
    y1 = m(x1)
    handle = m.branches()[0].register_forward_hook(lambda *a: calls.append(1))
    x2 = x.clone().requires_grad_()
    y2 = m(x2)
    handle.remove()
    assert calls == [1]  # the hooked run went branch-wise
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y1)
    grads1 = torch.autograd.grad(y1, [x1, *m.parameters()], g)
    grads2 = torch.autograd.grad(y2, [x2, *m.parameters()], g)
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    m.train()
    assert not m._can_fold(m.branches())


def _deployed_unit(channels=6, m=11, n=3):
    torch.manual_seed(0)
    lk = LargeKernelConv(channels, m, n, dict(type='BN')).eval()
    randomize_bn_and_scales(lk)
    lk.switch_to_deploy()
    return lk


def _dense(lk, x):
    """Independent reference: the M×M depthwise conv the deployed module holds."""
    w, b = lk.merged.weight, lk.merged.bias
    return torch.nn.functional.conv2d(x, w, b, padding=w.shape[-1] // 2, groups=w.shape[0])


@pytest.mark.parametrize('change', ['mul_', 'copy_', 'optimizer', 'new_parameter', 'load_state_dict'])
def test_deployed_unit_sees_weight_changes(change):
    """The band kernels split from the merged kernel are cached; every way of changing the weight through the
    parameter (not ``.data``) is seen on the next call, which then matches the M×M conv of the new weight
    (float32, tolerance 1e-5: the same products summed in another order)."""
    lk = _deployed_unit()
    x = torch.randn(2, 6, 13, 17)
    with torch.no_grad():
        before = lk(x)
    torch.testing.assert_close(before, _dense(lk, x), rtol=0, atol=1e-5)
    w = lk.merged.weight
    w0 = w.detach().clone()
    cross = torch.zeros_like(w)  # a new cross-shaped kernel (still runs as bands)
    cross[:, :, 4:7, :] = torch.randn(6, 1, 3, 11)
    cross[:, :, :, 4:7] = torch.randn(6, 1, 11, 3)
    if change == 'mul_':
        with torch.no_grad():
            w.mul_(-2)
    elif change == 'copy_':
        with torch.no_grad():
            w.copy_(cross)
    elif change == 'optimizer':  # gradients reach the merged kernel, and the step changes it
        opt = torch.optim.SGD(lk.parameters(), lr=0.5)
        with pytest.warns(UserWarning, match='dense M×M conv'):
            lk(x).square().mean().backward()
        opt.step()
    elif change == 'new_parameter':
        lk.merged.weight = torch.nn.Parameter(cross)
    else:
        lk.load_state_dict({'merged.weight': cross, 'merged.bias': lk.merged.bias.detach() + 1})
    with torch.no_grad():
        after = lk(x)
        expected = _dense(lk, x)
    assert not torch.equal(lk.merged.weight.detach(), w0)  # the kernel itself changed
    assert not torch.allclose(expected, before, atol=1e-3)  # and that matters
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-5)


def test_deployed_unit_gradients_are_the_dense_kernels():
    """With gradients on, every tap of the merged M×M kernel gets its gradient (the corners too: they are weights
    of the module, even where they are zero), equal to F.conv2d's; with the weights frozen, the input gradient
    still comes from the bands (same values)."""
    lk = _deployed_unit()
    x = torch.randn(2, 6, 13, 17, requires_grad=True)
    g = torch.randn(2, 6, 13, 17)
    with pytest.warns(UserWarning, match=r'torch.no_grad\(\).*two bands'):  # says how to get the fast path
        y = lk(x)
    dx, dw, db = torch.autograd.grad(y, (x, lk.merged.weight, lk.merged.bias), g)
    ref = _dense(lk, x)
    rdx, rdw, rdb = torch.autograd.grad(ref, (x, lk.merged.weight, lk.merged.bias), g)
    for a, b in ((dx, rdx), (dw, rdw), (db, rdb)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())
    assert dw[:, :, :4, :4].abs().sum() > 0  # the corners' gradients, which the bands would leave at zero
    lk.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # frozen weights: the bands, no warning
        (dx_frozen,) = torch.autograd.grad(lk(x), x, g)
    assert lk._bands is not None and len(lk._bands[1]) == 2  # ran as the two bands
    torch.testing.assert_close(dx_frozen, rdx, rtol=0, atol=1e-4 * rdx.abs().max().item())


def test_deployed_backbone_compiles_to_one_graph():
    """torch.compile traces a deployed SLaK as one graph, with no eager call first: ``switch_to_deploy`` and
    ``load_state_dict`` split the bands (the data-dependent cross-kernel check) outside the graph (before, the check
    broke the graph at every block: 14 graphs), and the band cache's other checks stay out of dynamo's way (a
    functorch query there broke it too). Compiled outputs equal eager's (float32, 1e-5)."""
    torch.manual_seed(0)
    arch, ks = dict(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8]), [13, 11, 9, 7, 3]
    model = SLaK(arch, kernel_size=ks).eval()
    randomize_bn_and_scales(model)
    model.switch_to_deploy()
    loaded = SLaK(arch, kernel_size=ks, deploy=True).eval()
    loaded.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    for m in (model, loaded):
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(m)(x)
            compiled = torch.compile(m)(x)
            eager = m(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_compiled_deployed_unit_reads_the_live_weight():
    """A compiled deployed block slices its bands from the weight in the graph: an in-place change between two
    compiled calls (no eager call in between) is seen, and the result matches the M×M conv of the new weight
    (float32, 1e-5)."""
    lk = _deployed_unit()
    x = torch.randn(2, 6, 13, 17)
    torch._dynamo.reset()
    compiled = torch.compile(lk)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), _dense(lk, x), rtol=0, atol=1e-5)
        lk.merged.weight[:, :, 4:7, :].mul_(-3)  # still a cross
        expected = _dense(lk, x)
        torch.testing.assert_close(compiled(x), expected, rtol=0, atol=1e-5)
