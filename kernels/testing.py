"""Shared helpers for kernel tests and benchmarks: one relative-error definition for all of them,
and the random memory inputs / chunk loop that the tests and ``bench/kernels.py`` share."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.memory import memory_chunk


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / max(||b||, tiny)`` in float64 (Frobenius norms); ``b`` is the reference.

    Both zero gives 0; a nonzero ``a`` against an all-zero ``b`` gives ``||a|| / tiny`` (large), so a
    spurious gradient is never hidden. Shapes must match.
    """
    if a.shape != b.shape:
        raise ValueError(f"rel_err shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a64, b64 = a.detach().double(), b.detach().double()
    return ((a64 - b64).norm() / b64.norm().clamp_min(1e-30)).item()


def memory_inputs(spec, N, T, d, e=2, d_out=None, dtype=torch.float32, token_dtype=None, device="cpu",
                  seed=0, eta_scale=1.0, alpha_gap=0.2):
    """Random inputs (leaves requiring grad) of one memory over a whole sequence, rows of different
    content. States, momenta and beta in ``dtype``; per-token tensors (k, vhat, q, eta, alpha) in
    ``token_dtype`` (default ``dtype``), e.g. bf16 tokens with fp32 state. ``eta`` lies in
    ``eta_scale * [0.05, 0.45]`` (long MLP runs need ~1/chunk, as the model's chunk-mean eta); ``alpha`` in
    ``[1 - alpha_gap, 1]`` (long runs need a small gap, or every state decays to nothing)."""
    token_dtype = dtype if token_dtype is None else token_dtype
    g = torch.Generator().manual_seed(seed)
    d_out = d if d_out is None else d_out
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale)  # noqa: E731
    if spec.kind == "linear":
        state = (torch.eye(d_out, d).expand(N, d_out, d) * 0.5 + r(N, d_out, d, scale=0.1),)
    else:
        h = e * d
        state = (r(N, d_out, h, scale=0.1), r(N, h, d, scale=d ** -0.5))
    ins = dict(
        state=state,
        mom=tuple(r(*s.shape, scale=0.01) for s in state) if spec.momentum else None,
        k=F.normalize(r(N, T, d), dim=-1), vhat=r(N, T, d_out),
        eta=eta_scale * (0.05 + 0.4 * torch.rand(N, T, generator=g)),
        alpha=1.0 - alpha_gap * torch.rand(N, T, generator=g),
        beta=0.5 + 0.4 * torch.rand(N, generator=g) if spec.momentum else None,
        q=F.normalize(r(N, T, d), dim=-1),
    )

    tokens = ("k", "vhat", "q", "eta", "alpha")
    return {k: as_leaves(v, token_dtype if k in tokens else dtype, device) for k, v in ins.items()}


def as_leaves(x, dtype, device=None):
    """Detached copies (of a tensor, a tuple of tensors or None) that require grad."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(as_leaves(y, dtype, device) for y in x)
    return x.detach().to(device=device or x.device, dtype=dtype).requires_grad_()


def run_sequence(spec, ins, chunk, impl):
    """The model's loop: one ``memory_chunk`` per chunk, the last chunk possibly short."""
    state, mom, outs = ins["state"], ins["mom"], []
    T = ins["k"].shape[1]
    for s in range(0, T, chunk):
        sl = slice(s, min(s + chunk, T))
        o, state, mom = memory_chunk(spec, state, mom, ins["k"][:, sl], ins["vhat"][:, sl], ins["eta"][:, sl],
                                     ins["alpha"][:, sl], ins["beta"], ins["q"][:, sl], impl=impl)
        outs.append(o)
    return (torch.cat(outs, 1),) + tuple(state) + (tuple(mom) if mom is not None else ())


def flat_inputs(ins):
    """``{name: tensor}`` with the state and momentum tuples split (W0/W1/W2, S0/S1/S2 ...)."""
    out = {}
    for k, v in ins.items():
        if isinstance(v, tuple):
            out.update({f"{k}{i}": x for i, x in enumerate(v)})
        elif v is not None:
            out[k] = v
    return out


def interpreter_on() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def run_interpreter_cases(test_file: str, minimum: int, keyword: str = "test_interp_", timeout: int = 900):
    """Re-run ``test_file``'s ``keyword`` cases in a subprocess with ``TRITON_INTERPRET=1`` (the
    interpreter must be on before Python starts) and assert at least ``minimum`` passed, none
    skipped or failed. The one driver every interpreter test file uses."""
    import os
    import re
    import subprocess
    import sys

    import pytest
    if interpreter_on():
        pytest.skip("already inside the interpreter run")
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", os.path.abspath(test_file),
           "-k", keyword]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    found = re.search(r"(\d+) passed", summary)
    passed = int(found.group(1)) if found else 0
    assert passed >= minimum and "skipped" not in summary and "failed" not in summary, tail
    return passed
