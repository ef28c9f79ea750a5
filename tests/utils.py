# -*- coding: utf-8 -*-
"""Helpers shared by the tests."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp64 (0 when both are exactly zero)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num if den == 0 else num / den


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """Relative error bound, with a readable message; NaNs always fail."""
    assert not torch.isnan(out).any(), f"{name}: NaN in output (unwritten memory?)"
    err = rel_err(out, ref)
    assert err <= ratio, f"{name}: relative error {err:.3e} > {ratio:.1e}"


def make_inputs(B, T, HQ, H, D, Dv=None, Dl=None, dtype=torch.float64, seed=0, lin=False, requires_grad=True):
    """Random q, k, v (and q_lin, k_lin when ``lin``) with a little block structure in the keys."""
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    q = torch.randn(B, T, HQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    # a slowly varying component per 16 tokens so blocks differ in mean and spread
    k += 0.7 * torch.randn(B, (T + 15) // 16, H, D, generator=g, dtype=torch.float64).repeat_interleave(16, 1)[:, :T]
    v = torch.randn(B, T, H, Dv, generator=g, dtype=torch.float64)
    xs = [q, k, v]
    if lin:
        Dl = Dl or D
        xs += [torch.randn(B, T, HQ, Dl, generator=g, dtype=torch.float64),
               torch.randn(B, T, H, Dl, generator=g, dtype=torch.float64)]
    return [x.to(dtype).requires_grad_(requires_grad) for x in xs]
