"""The SSL_NT_XENT dispatch (common/nt_xent.py, nt_xent_rows): ref never calls the op, ext uses
it or fails loudly, auto uses it when built and falls back to the reference otherwise; and the
modules' import structure (the op module imports neither the dispatch nor the check).
"""

from __future__ import annotations

import pytest
import torch
from nt_xent_cases import ROOT, _small_inputs, needs_ext

from common import nt_xent, nt_xent_check
from common import nt_xent_op as op
from common.nt_xent import nt_xent_reference
from simclr import nt_xent_loss


def test_dispatch_ref_never_calls_the_op(monkeypatch):
    monkeypatch.setenv("SSL_NT_XENT", "ref")

    def boom(*a, **k):
        raise AssertionError("the op must not be called with SSL_NT_XENT=ref")

    monkeypatch.setattr(op, "nt_xent_fused", boom)
    out = nt_xent.nt_xent_rows(*_small_inputs(), 0.1)
    assert out.shape == (6,)


def test_dispatch_ext_fails_loudly_when_missing(monkeypatch):
    monkeypatch.setenv("SSL_NT_XENT", "ext")
    monkeypatch.setattr(op, "available", lambda device: False)
    with pytest.raises(RuntimeError, match="SSL_NT_XENT=ext"):
        nt_xent.nt_xent_rows(*_small_inputs(), 0.1)


def test_dispatch_auto_falls_back_to_reference(monkeypatch):
    monkeypatch.setenv("SSL_NT_XENT", "auto")
    monkeypatch.setattr(op, "available", lambda device: False)
    rows, cols, pos, self_idx = _small_inputs()
    out = nt_xent.nt_xent_rows(rows, cols, pos, self_idx, 0.1)
    assert torch.equal(out, nt_xent_reference(rows, cols, pos, self_idx, 0.1))


def test_dispatch_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv("SSL_NT_XENT", "fast")
    with pytest.raises(ValueError, match="SSL_NT_XENT"):
        nt_xent.nt_xent_rows(*_small_inputs(), 0.1)


def test_no_import_cycle_between_losses_and_the_op():
    """The dispatch (common.nt_xent, formerly common.losses) imports the op module and the check
    lazily and optionally; the op module imports neither, the check imports only the op module."""
    import ast

    def imports(name: str) -> set[str]:
        tree = ast.parse((ROOT / "common" / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported |= {f"{node.module}.{a.name}" for a in node.names} | {node.module or ""}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        return imported

    def imports_any(imported: set[str], modules: tuple[str, ...]) -> bool:
        return any(m in modules or m.startswith(tuple(f"{x}." for x in modules)) for m in imported)

    op_imports, check_imports = imports("nt_xent_op"), imports("nt_xent_check")
    assert not imports_any(op_imports, ("common.nt_xent", "common.nt_xent_check")), op_imports
    assert not any("losses" in m for m in op_imports | check_imports)
    assert not imports_any(check_imports, ("common.nt_xent",)), check_imports
    assert "common.nt_xent_op" in check_imports


def test_available_is_false_when_not_loaded(monkeypatch):
    monkeypatch.setattr(op, "_LOAD_ERROR", "ImportError: test")
    assert not op.available("cpu") and not op.available("cuda")
    assert "test" in op.load_error()


@needs_ext
@pytest.mark.parametrize("impl", ["ext", "auto"])
def test_dispatch_uses_the_op(monkeypatch, impl):
    monkeypatch.setenv("SSL_NT_XENT", impl)
    calls = []
    real = op.nt_xent_fused

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    assert nt_xent_check.self_check("cpu", 4) is None  # the first-use check (a child process)
    monkeypatch.setattr(op, "nt_xent_fused", spy)
    rows, cols, pos, self_idx = _small_inputs()
    out = nt_xent.nt_xent_rows(rows, cols, pos, self_idx, 0.1)
    assert calls == [1]
    assert nt_xent.nt_xent_impl_used() == "ext"
    torch.testing.assert_close(out, nt_xent_reference(rows, cols, pos, self_idx, 0.1))


@needs_ext
def test_nt_xent_loss_ext_equals_ref(monkeypatch):
    """The training-script entry point (z1, z2 -> mean loss) gives the same loss and input
    gradients through the op and through the reference."""
    g = torch.Generator().manual_seed(11)
    z1, z2 = torch.randn(24, 16, generator=g) * 3, torch.randn(24, 16, generator=g)
    out = {}
    for impl in ("ext", "ref"):
        monkeypatch.setenv("SSL_NT_XENT", impl)
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = nt_xent_loss(a, b, 0.1)
        loss.backward()
        out[impl] = (loss.detach(), a.grad, b.grad)
    for x, y in zip(out["ext"], out["ref"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
