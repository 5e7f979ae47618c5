"""Self-modifying Titans: chunk-parallel == token-by-token reference, causality, isolation, GDN."""
import itertools

import pytest
import torch

from nl_pretrain.config import ModelConfig
from nl_pretrain.model.smt import SelfModifyingTitans
from nl_pretrain.model.smt_reference import smt_sequential

DT = torch.float64


def layer_for(**kw):
    base = dict(d_model=16, n_heads=2, memory_impl="torch", memory_expansion=2.0, eta_max=1.0,
                mlp_eta_scale=1.0)
    base.update(kw)
    torch.manual_seed(1)
    layer = SelfModifyingTitans(ModelConfig(**base)).double()
    with torch.no_grad():  # larger-than-init weights so every path carries signal
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def grads(layer, y):
    w = torch.sin(torch.arange(y.numel(), dtype=DT)).view_as(y)
    return torch.autograd.grad((y * w).sum(), [p for p in layer.parameters()], allow_unused=True)


VARIANTS = list(itertools.product(["linear", "mlp"], ["linear", "mlp"], ["gd", "dgd"], [True, False]))


@pytest.mark.parametrize("proj,main,rule,momentum", VARIANTS)
@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_adaptive_chunk_equals_sequential(proj, main, rule, momentum, chunk):
    layer = layer_for(proj_memory=proj, main_memory=main, rule=rule, momentum=momentum,
                      chunk_mem=chunk, chunk_proj=max(1, chunk - 1) if chunk > 1 else 1)
    x = torch.randn(2, 19, 16, dtype=DT)                 # T = 19: no chunk size divides it
    y_chunk, y_seq = layer(x), smt_sequential(layer, x)
    torch.testing.assert_close(y_chunk, y_seq, rtol=1e-10, atol=1e-11)
    for g1, g2, (name, _) in zip(grads(layer, y_chunk), grads(layer, y_seq), layer.named_parameters()):
        if name == "beta_logit" and not momentum:
            assert g1 is None and g2 is None              # no momentum: beta is unused
            continue
        assert g1 is not None and g2 is not None, name
        torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("main,loss,grad_at", [("linear", "l2", "running"), ("linear", "dot", "chunk_start"),
                                               ("mlp", "l2", "chunk_start"), ("linear", "l2", "chunk_start")])
@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_static_projection_variants(main, loss, grad_at, chunk):
    layer = layer_for(adaptive_projections=False, self_targets=False, main_memory=main, inner_loss=loss,
                      linear_grad=grad_at, rule="dgd", chunk_mem=chunk)
    x = torch.randn(2, 19, 16, dtype=DT)
    y_chunk, y_seq = layer(x), smt_sequential(layer, x)
    torch.testing.assert_close(y_chunk, y_seq, rtol=1e-10, atol=1e-11)
    for g1, g2 in zip(grads(layer, y_chunk), grads(layer, y_seq)):
        torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)


def test_gradients_reach_initial_states_and_projections():
    layer = layer_for(chunk_mem=4, chunk_proj=4)
    x = torch.randn(1, 12, 16, dtype=DT)
    named = dict(zip([n for n, _ in layer.named_parameters()], grads(layer, layer(x))))
    for name in ("main_init.weights.0", "main_init.weights.1", "proj_init.k.weights.0", "proj_init.eta.weights.0",
                 "w_u.weight", "w_q.weight", "beta_logit", "eta_bias", "alpha_bias"):
        assert named[name] is not None and named[name].abs().sum() > 0, name


@pytest.mark.parametrize("adaptive", [True, False])
def test_causality_bitwise(adaptive):
    layer = layer_for(adaptive_projections=adaptive, self_targets=adaptive, chunk_mem=4, chunk_proj=3)
    x = torch.randn(1, 20, 16, dtype=DT)
    with torch.no_grad():
        base = layer(x)
        for j in (0, 7, 13, 19):
            x2 = x.clone()
            x2[:, j] += torch.randn(16, dtype=DT)
            y = layer(x2)
            assert torch.equal(y[:, :j], base[:, :j]), f"output before {j} changed"
            assert not torch.allclose(y[:, j:], base[:, j:]), f"perturbing {j} changed nothing after it"


def test_batch_isolation():
    layer = layer_for(chunk_mem=4, chunk_proj=4)
    x = torch.randn(3, 11, 16, dtype=DT)
    with torch.no_grad():
        together = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-13)


def gated_delta_rule(q, k, v, beta_erase, alpha):
    """Plain loop in fla's GatedDeltaNet form: S_t = alpha_t S_{t-1} (I - b_t k k^T) + b_t v k^T;
    o_t = S_{t-1} q_t (read before the write)."""
    N, T, d = k.shape
    S = torch.zeros(N, v.shape[-1], d, dtype=k.dtype)
    outs = []
    for t in range(T):
        outs.append(torch.einsum("nod,nd->no", S, q[:, t]))
        kt, vt, bt, at = k[:, t], v[:, t], beta_erase[:, t, None, None], alpha[:, t, None, None]
        S = at * (S - bt * torch.einsum("nod,nd,ne->noe", S, kt, kt)) + bt * torch.einsum("no,nd->nod", vt, kt)
    return torch.stack(outs, 1)


def test_gated_deltanet_configuration_is_the_gated_delta_rule():
    """Linear memory, no momentum, static projections, plain targets, gd + running L2 gradient:
    M_t = M_{t-1}(alpha I - eta k k^T) + eta v k^T  ==  gated delta rule with b = eta / alpha."""
    layer = layer_for(adaptive_projections=False, self_targets=False, main_memory="linear", rule="gd",
                      inner_loss="l2", linear_grad="running", momentum=False, chunk_mem=5)
    with torch.no_grad():
        layer.main_init.weights[0].zero_()               # the delta rule starts from S_0 = 0
        x = torch.randn(2, 17, 16, dtype=DT)
        k, v, eta, alpha = layer.inputs(x)
        q = layer.queries(x)
        # parameter map: b = eta / alpha and values alpha * v (fla scales the erase by its gate)
        expected = layer.output(gated_delta_rule(q, k, alpha[..., None] * v, eta / alpha, alpha), x)
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
