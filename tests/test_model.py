"""The decoder against independent references: counts, causality, GQA, RoPE, attention, loss, KV cache."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

import cpu_kernels.attention
from model.attention import attend, resolve_backend
from model.config import ModelConfig
from model.llama import RMSNorm, Transformer, apply_rope, count_parameters, rope_tables
from model.loss import linear_cross_entropy
from model.sampling import generate, model_step, no_cache_step
from tests.conftest import tiny_config
from training.config import model_preset


def test_tinyllama_parameter_count_on_meta_device():
    total, active = count_parameters(model_preset("tinyllama-1.1b"))
    assert total == active == 1_100_048_384
    assert 1_000_000 < count_parameters(model_preset("tiny"))[0] < 10_000_000


def test_causality_future_tokens_do_not_change_earlier_logits():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    a = torch.randint(0, 512, (2, 24))
    b = a.clone()
    b[:, 12:] = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    torch.testing.assert_close(la[:, :12], lb[:, :12], rtol=0, atol=1e-5)
    assert (la[:, 12:] - lb[:, 12:]).abs().max() > 1e-3


def reference_attention(q_BTHD, k_BTHD, v_BTHD, offset=0):
    """Plain softmax(QK^T / sqrt(d) + causal mask) V with explicit loops over nothing but tensors."""
    q, k, v = (t.transpose(1, 2).double() for t in (q_BTHD, k_BTHD, v_BTHD))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    tq, tk = q.shape[2], k.shape[2]
    allowed = torch.arange(tk)[None, :] <= (torch.arange(tq)[:, None] + offset)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


ATTENTION = {"sdpa": attend, "cpu matmul": cpu_kernels.attention._matmul_attention_or_reference}


@pytest.mark.parametrize("backend", list(ATTENTION))
def test_gqa_equals_full_attention_with_repeated_kv(backend):
    torch.manual_seed(0)
    q = torch.randn(2, 16, 8, 16)
    k, v = torch.randn(2, 16, 2, 16), torch.randn(2, 16, 2, 16)
    out = ATTENTION[backend](q, k, v, "sdpa")
    full = ATTENTION[backend](q, k.repeat_interleave(4, dim=2), v.repeat_interleave(4, dim=2), "sdpa")
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", list(ATTENTION))
@pytest.mark.parametrize("tq", [16, 1, 5])
@pytest.mark.parametrize("query_block", [128, 6])
def test_attention_matches_reference(backend, tq, query_block, monkeypatch):
    """Full causal attention and, with a KV cache, queries that are the last tq of 16 positions: forward and
    backward in fp32, forward in bf16; the CPU plug-in's matmul path (forced here for fp32 too) in one block of
    queries, and in blocks of 6, 6 and 4."""
    monkeypatch.setattr("cpu_kernels.attention.QUERY_BLOCK", query_block)
    fn = ATTENTION[backend]
    torch.manual_seed(1)
    q = torch.randn(2, tq, 8, 8, requires_grad=True)
    k, v = torch.randn(2, 16, 2, 8, requires_grad=True), torch.randn(2, 16, 2, 8, requires_grad=True)
    ours = fn(q, k, v, "sdpa")
    ref = reference_attention(q, k.repeat_interleave(4, 2), v.repeat_interleave(4, 2), 16 - tq)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=0)
    low = fn(q.bfloat16(), k.bfloat16(), v.bfloat16(), "sdpa")
    torch.testing.assert_close(low.double(), ref, atol=3e-2, rtol=0)


def test_rope_matches_complex_rotation():
    """Rotate-half RoPE == multiplying (x_i, x_{i+d/2}) as a complex number by exp(i * pos * theta^(-2i/d))."""
    torch.manual_seed(2)
    head_dim, T = 16, 10
    x = torch.randn(1, T, 3, head_dim, dtype=torch.float64)
    cos, sin = rope_tables(head_dim, T, 10000.0)
    ours = apply_rope(x, cos.double(), sin.double())
    half = head_dim // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    rotation = torch.polar(torch.ones(T, half, dtype=torch.float64), torch.arange(T)[:, None] * freqs)
    z = torch.complex(x[..., :half], x[..., half:]) * rotation[None, :, None, :]
    torch.testing.assert_close(ours, torch.cat([z.real, z.imag], dim=-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_its_gradients_equal_the_formula(dtype):
    """RMSNorm against autograd through w * x / sqrt(mean(x^2) + eps) in fp64: fp32 to rounding, bf16 within 1%
    relative (one bf16 rounding is 0.4%)."""
    torch.manual_seed(4)
    norm = RMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(64))
    x = (3 * torch.randn(2, 5, 64)).to(dtype).requires_grad_()
    dy = torch.randn(2, 5, 64).to(dtype)
    y = norm(x)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    y64 = w64 * x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-5)
    y64.backward(dy.double())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for ours, ref in [(y, y64), (x.grad, x64.grad), (norm.weight.grad, w64.grad)]:
        assert ours.dtype == dtype
        assert ((ours.double() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_full_cross_entropy(dtype, monkeypatch):
    """Value and gradients of the chunked head+loss equal logits -> F.cross_entropy (several chunks, ignored rows)."""
    monkeypatch.setattr("model.loss.CHUNK_LOGITS", 40 * 300)  # 40 rows per chunk: 3 chunks of 100 rows
    torch.manual_seed(3)
    h = torch.randn(100, 32, dtype=dtype, requires_grad=True)
    w = (torch.randn(300, 32) * 0.2).to(dtype).requires_grad_()
    t = torch.randint(0, 300, (100,))
    t[::7] = -100
    ours, _ = linear_cross_entropy(h, w, t)
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy((h @ w.t()).float(), t)
    ref.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gh, h.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(gw, w.grad, atol=tol, rtol=tol)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t)[0], ref, atol=tol, rtol=tol)


def loss_batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [100, 32], w [300, 32] and targets with every 7th ignored: 3 chunks of 40 rows once chunks are shrunk."""
    torch.manual_seed(3)
    h = torch.randn(100, 32).to(dtype)
    w = (torch.randn(300, 32) * 0.2).to(dtype)
    t = torch.randint(0, 300, (100,))
    t[::7] = -100
    return h, w, t


def reference_loss_terms(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, coef: float) -> dict[str, torch.Tensor]:
    """Cross-entropy, mean log²Z and the gradients of cross-entropy + coef x log²Z, from full fp64 logits with
    F.cross_entropy and torch.logsumexp (the same, possibly rounded, inputs)."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    logits = h64 @ w64.t()
    ce = F.cross_entropy(logits, t)
    z = torch.logsumexp(logits, dim=-1)[t != -100].square().mean()
    (ce + coef * z).backward()
    return {"loss": ce.detach(), "z": z.detach(), "h": h64.grad, "w": w64.grad}


def loss_terms(loss_fn, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, coef: float) -> dict[str, torch.Tensor]:
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, z = loss_fn(h, w, t, coef)
    loss.backward()
    return {"loss": loss.detach(), "z": z, "h": h.grad, "w": w.grad}


@pytest.mark.parametrize("coef", [0.0, 1e-4, 0.1])
def test_output_z_loss_value_and_gradients_equal_an_fp64_reference(coef, monkeypatch):
    """The chunked loss's cross-entropy, log²Z and gradients w.r.t. h and the head weight (fp32, 3 chunks, ignored
    rows) against fp64 F.cross_entropy + logsumexp². 1e-4 (PaLM's) moves the head weight's gradient by over 10x
    the fp32 tolerance, so a z-loss left out of the gradient fails; without grad the values agree too."""
    monkeypatch.setattr("model.loss.CHUNK_LOGITS", 40 * 300)
    h, w, t = loss_batch(torch.float32)
    ours, ref = loss_terms(linear_cross_entropy, h, w, t, coef), reference_loss_terms(h, w, t, coef)
    for name in ref:
        torch.testing.assert_close(ours[name].double(), ref[name], atol=1e-6, rtol=1e-5, msg=name)
    if coef:
        plain = reference_loss_terms(h, w, t, 0.0)
        assert (ref["w"] - plain["w"]).norm() > 10 * 1e-5 * ref["w"].norm()  # the z-term is really tested
    with torch.no_grad():
        loss, z = linear_cross_entropy(h, w, t, coef)
    torch.testing.assert_close((loss.double(), z.double()), (ref["loss"], ref["z"]), atol=1e-6, rtol=1e-5)


def test_loss_of_a_confident_wrong_prediction_stays_exact():
    """A target whose probability underflows fp32 (loss > 69 nats) still gets its exact loss."""
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    w = torch.tensor([[200.0, 0.0], [0.0, 1.0], [-200.0, 0.0]])
    t = torch.tensor([2, 1])
    ours, _ = linear_cross_entropy(h, w, t)
    ref = F.cross_entropy(h @ w.t(), t)
    assert torch.isfinite(ours) and ours.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("moe", [False, True])
def test_kv_cache_greedy_equals_no_cache(moe):
    torch.manual_seed(4)
    model = Transformer(tiny_config(num_experts=4 if moe else 0)).eval()
    prompt = torch.randint(3, 512, (2, 7))
    cached = generate(model_step(model, 2, 40), prompt, 30)
    uncached = generate(no_cache_step(model), prompt, 30)
    assert torch.equal(cached, uncached)


def test_attention_backend_choice():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.bfloat16) == "sdpa"
    assert resolve_backend("auto", cpu, torch.float32) == "sdpa"
    assert resolve_backend("sdpa", cpu, torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="model.attention=flash cannot run"):
        resolve_backend("flash", cpu, torch.bfloat16)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"top_k": 9, "num_experts": 8}, "model.top_k"),
        ({"num_experts": 1}, "model.num_experts"),
        ({"n_heads": 3}, "model.dim"),
        ({"n_kv_heads": 3}, "model.n_heads"),
    ],
)
def test_bad_model_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ModelConfig(**{**tiny_config().to_dict(), **overrides})


def test_loss_gradient_at_a_confident_target_in_bf16():
    """At p = 0.995 the logit gradient p - 1 = -0.005 must survive bf16 inputs: bf16 probabilities would round p to
    1 (bf16 steps near 1 are 2^-8 = 0.0039) and lose it. Against an fp64 loss of the same bf16-rounded inputs, the
    gradients agree within bf16 output rounding (2^-8 relative) plus the per-chunk rounding of the matmuls."""
    V, D = 64, 16
    torch.manual_seed(5)
    w = (torch.randn(V, D) * 0.1).bfloat16()
    h = torch.zeros(4, D)
    h[:, 0] = 1.0  # every row scores w[:, 0]
    with torch.no_grad():
        w[:, 0] = 0
        w[7, 0] = math.log(0.995 / 0.005 * (V - 1))  # softmax gives the target 7 a probability of 0.995
    h = h.bfloat16().requires_grad_()
    w.requires_grad_()
    t = torch.full((4,), 7)
    linear_cross_entropy(h, w, t)[0].backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    F.cross_entropy(h64 @ w64.t(), t).backward()
    assert float((h64 @ w64.t()).detach().softmax(-1)[0, 7]) == pytest.approx(0.995, abs=1e-3)
    for ours, ref in [(h.grad, h64.grad), (w.grad, w64.grad)]:
        assert ((ours.double() - ref).norm() / ref.norm()).item() < 2**-7


def test_a_broken_flash_attn_install_falls_back_to_sdpa_with_a_notice(monkeypatch, capsys):
    """A wheel built for another torch imports as a package but fails at its first call: the probe's tiny call
    finds that, `auto` falls back to SDPA with a one-line notice, and an explicit `flash` is an error saying why."""
    import types

    import model.attention as attention

    broken = types.ModuleType("flash_attn")

    def flash_attn_func(*args, **kwargs):
        raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice")

    broken.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", broken)
    reason = attention._probe_flash_attn(torch.device("cpu"))
    assert "does not run here" in reason and "undefined symbol" in reason
    cuda = torch.device("cuda", 0)
    monkeypatch.setitem(attention._flash_problems, (cuda, torch.bfloat16), reason)
    assert resolve_backend("auto", cuda, torch.bfloat16) == "sdpa"
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(ValueError, match="model.attention=flash cannot run: flash-attn is installed but"):
        resolve_backend("flash", cuda, torch.bfloat16)
