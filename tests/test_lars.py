"""simclr.LARS (multi-tensor `torch._foreach_*` ops, state made once) against the per-parameter
loop it replaced, kept here as the reference."""

import copy

import pytest
import torch

import simclr


class ReferenceLARS(torch.optim.Optimizer):
    """The per-parameter LARS simclr.py had before (a copy: the reference the new one must
    reproduce)."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, eta: float):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                trust = 1.0
                if not g.get("exclude", False):
                    grad = grad.add(p, alpha=g["weight_decay"])
                    w_norm, g_norm = torch.linalg.norm(p), torch.linalg.norm(grad)
                    ok = (w_norm > 0) & (g_norm > 0)
                    trust = torch.where(ok, g["eta"] * w_norm / g_norm.clamp_min(1e-30), 1.0)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(grad * (trust * g["lr"]))
                p.sub_(buf)


def _model(seed=0):
    torch.manual_seed(seed)
    m = simclr.SimCLR(simclr.build_backbone("resnet18", "cifar", 8), 16)
    with torch.no_grad():  # a zero weight (trust 1 branch) and a no-grad parameter
        m.head[0].weight[:3].zero_()
    m.head[1].bias.requires_grad_(False)
    return m


@pytest.mark.parametrize("wd,momentum", [(1e-4, 0.9), (0.0, 0.0)])
def test_foreach_lars_matches_the_per_parameter_loop(wd, momentum):
    a, b = _model(), _model()
    opt_a = simclr.LARS(simclr.param_groups(a), 2.0, momentum, wd, 1e-3)
    opt_b = ReferenceLARS(simclr.param_groups(b), 2.0, momentum, wd, 1e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(20):
        for g_a, g_b in zip(opt_a.param_groups, opt_b.param_groups):
            g_a["lr"] = g_b["lr"] = 2.0 * (1 - step / 20)  # as set_lr does
        for pa, pb in zip(a.parameters(), b.parameters()):
            if not pa.requires_grad:
                continue
            grad = torch.randn(pa.shape, generator=gen) * (0.0 if step == 3 else 1.0)
            pa.grad, pb.grad = grad.clone(), grad.clone()  # (step 3: all-zero gradients)
        opt_a.step()
        opt_b.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6, msg=name)
        assert not torch.equal(pa, _model().state_dict()[name]) or not pa.requires_grad, name
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()  # same checkpoint layout
    for k in sa["state"]:
        torch.testing.assert_close(
            sa["state"][k]["momentum_buffer"],
            sb["state"][k]["momentum_buffer"],
            rtol=1e-6,
            atol=1e-6,
        )


def test_state_is_made_once_and_survives_a_reload():
    m = _model()
    opt = simclr.LARS(simclr.param_groups(m), 1.0, 0.9, 1e-4, 1e-3)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    ptrs = {id(p): opt.state[p]["momentum_buffer"].data_ptr() for p in opt.state}
    opt.step()
    assert {id(p): opt.state[p]["momentum_buffer"].data_ptr() for p in opt.state} == ptrs
    m2 = copy.deepcopy(m)
    opt2 = simclr.LARS(simclr.param_groups(m2), 1.0, 0.9, 1e-4, 1e-3)
    opt2.load_state_dict(
        copy.deepcopy(opt.state_dict())
    )  # a resumed run continues with the loaded buffers
    for p, p2 in zip(m.parameters(), m2.parameters()):
        p2.grad = p.grad.clone()
    opt.step()
    opt2.step()
    for p, p2 in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, p2)
