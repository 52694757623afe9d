"""Shared helpers for the kernel tests: run a module under a backend and collect output and every gradient."""
from __future__ import annotations

import contextlib

import torch

from megatron_protein.kernels import dispatch

TOLERANCES = {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=2e-5),
              torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def cotangent_like(out: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed random cotangent with bf16-representable values: the same numbers whatever the dtype under test."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).bfloat16().to(out.dtype)


def run_with_grads(module: torch.nn.Module, backend: str, inputs: list, seed: int = 0):
    """Forward ``module(*inputs)`` with ``backend`` ('triton', 'reference' or 'unfused'), backward a fixed random
    cotangent; return (output, grads of the float inputs that require grad, grads of the parameters)."""
    inputs = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
              for x in inputs]
    module.zero_grad(set_to_none=True)
    if backend == "unfused":
        fused_flags = {m: m.fused for m in module.modules() if hasattr(m, "fused")}
        for m in fused_flags:
            m.fused = False
        context = contextlib.nullcontext()
    else:
        fused_flags = {}
        context = dispatch.force_backend(backend)
    try:
        with context:
            torch.manual_seed(seed)
            out = module(*inputs)
            out.backward(cotangent_like(out, seed + 1))
    finally:
        for m, flag in fused_flags.items():
            m.fused = flag
    input_grads = [x.grad for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    param_grads = [p.grad for p in module.parameters()]
    return out.detach(), input_grads, param_grads


def assert_same(result_a, result_b, dtype=torch.float32, what=""):
    out_a, in_a, par_a = result_a
    out_b, in_b, par_b = result_b
    tol = TOLERANCES[dtype]
    assert not torch.isnan(out_a).any() and not torch.isnan(out_b).any(), f"{what}: NaN in output"
    torch.testing.assert_close(out_a.float(), out_b.float(), **tol, msg=lambda m: f"{what} output: {m}")
    for i, (ga, gb) in enumerate(zip(in_a, in_b)):
        assert not torch.isnan(ga).any(), f"{what}: NaN in input grad {i}"
        torch.testing.assert_close(ga.float(), gb.float(), **tol, msg=lambda m: f"{what} input grad {i}: {m}")
    for i, (ga, gb) in enumerate(zip(par_a, par_b)):
        torch.testing.assert_close(ga.float(), gb.float(), **tol, msg=lambda m: f"{what} param grad {i}: {m}")
