"""plrm.methods.optim: the fused kernel for CPU parameters, torch's arithmetic either way."""

import torch

from plrm.methods.optim import adam, fused_on_cpu


def _trajectory(make, steps=20):
    torch.manual_seed(0)
    a, b = torch.randn(7, 5, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = make([{"params": iter([a]), "lr": 0.05}, {"params": [b], "lr": 0.01}])
    for _ in range(steps):
        opt.zero_grad()
        ((a.sin() * torch.arange(5.0)).sum() + b.pow(3).sum()).backward()
        opt.step()
    return opt, torch.cat([a.detach().flatten(), b.detach()])


def test_cpu_parameters_get_the_fused_kernel_and_follow_torchs_default_adam():
    opt, mine = _trajectory(lambda groups: adam(groups, lr=0.1))
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["fused"] is True and [g["lr"] for g in opt.param_groups] == [0.05, 0.01]
    _, reference = _trajectory(lambda groups: torch.optim.Adam(groups, lr=0.1, foreach=False))
    torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6)


def test_weight_decay_makes_it_adamw_with_decoupled_decay():
    opt, mine = _trajectory(lambda groups: adam(groups, lr=0.1, weight_decay=0.3))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.3
    _, reference = _trajectory(lambda groups: torch.optim.AdamW(groups, lr=0.1, weight_decay=0.3, foreach=False))
    torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6)


def test_no_fused_kernel_under_mixed_precision_or_for_integer_and_empty_parameter_lists():
    p = torch.zeros(3, requires_grad=True)
    assert fused_on_cpu([p]) and fused_on_cpu([{"params": [p]}])
    assert not fused_on_cpu([p], mixed_precision=True)  # Lightning refuses clipping with a self-unscaling step
    assert not fused_on_cpu([])
    assert not fused_on_cpu([torch.zeros(3, dtype=torch.int64)])
    assert not adam([p], lr=0.1, mixed_precision=True).defaults["fused"]
