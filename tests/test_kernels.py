"""zotune.kernels: every op x implementation x dtype x noise kind x shape, against the twin.

The twin (each op's PyTorch code fed by zotune.noise, i.e. ZOTUNE_KERNELS=eager) is the
reference. Tolerances of the other implementations (Triton under TRITON_INTERPRET=1, compiled):

| noise      | output                | tolerance                       | why                                     |
|------------|-----------------------|---------------------------------|-----------------------------------------|
| rademacher | every dtype           | bit-equal                       | z is exact (bits of Philox); every path |
|            |                       |                                 | does the same float32 ops in the same   |
|            |                       |                                 | order, each correctly rounded, no FMA   |
| gaussian   | float32 (param,       | abs 1e-5                        | z differs by <= 8 eps32 relative (log & |
|            | master, optimizer     |                                 | cos: numpy in the interpreter, inductor |
|            | state)                |                                 | vs torch/MKL); the largest z term here  |
|            |                       |                                 | is |1.7 z| < 9.7, so < 9.3e-6 (measured |
|            |                       |                                 | <= 4.8e-7)                              |
| gaussian   | bfloat16 / float16    | abs 1e-5 + 1 ulp of the dtype   | that pre-rounding difference can flip   |
|            | param                 | (rel 2**-7 / 2**-10)            | the final rounding by one ulp           |
| gaussian   | any, given the same z | bit-equal                       | the arithmetic itself is identical      |
| gaussian   | Triton on a GPU       | the above + 1.7 x a bound on z's| tl.randn's log, sqrt and cos may be the |
|            | (triton-cuda)         | error per element               | GPU's approximate instructions          |
|            |                       | (conftest.fast_math_error)      |                                         |

Independent checks: the twin against the formulas in float64, Adam against torch.optim.AdamW,
momentum against torch.optim.SGD, shards against the whole tensor, and a wrong seed or offset
failing the same comparison the matrix uses.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import FAST_KERNEL_IMPLS as FAST_IMPLS
from conftest import KERNEL_DTYPES as DTYPES
from conftest import KERNEL_IMPLS as IMPLS
from conftest import CUDA_KERNELS, KERNEL_SEEDS, NATIVE, TRITON_CUDA
from conftest import assert_kernel_close, fast_math_error, kernel_slack, kernels_on
from conftest import forced_kernels as forced

from zotune.kernels import (
    _dispatch,
    _fused,
    _native,
    _philox,
    adam_update_,
    momentum_update_,
    move_perturbation_,
    perturb_,
    restore_and_update_,
)
from zotune.noise import KINDS, noise, noise_like

EPS32 = torch.finfo(torch.float32).eps
SEED, SEED2 = KERNEL_SEEDS
ENV = _dispatch.ENV
SHAPES = {  # name -> (shape, offset, transposed view)
    "3x5x7@77": ((3, 5, 7), 77, False),
    "1@0": ((1,), 0, False),
    "130@2^33+5": ((130,), 2**33 + 5, False),  # the counter's high word; rademacher counters past 2**32 too
    "9x5.T@1000": ((9, 5), 1000, True),  # non-contiguous: a (5, 9) view of a (9, 5) tensor
    "41x53@3000": ((41, 53), 3000, False),  # 3 Triton programs
}


def needs(impl):
    if impl in ("triton", TRITON_CUDA):
        pytest.importorskip("triton")
    if impl == "native" and _native.capability() is None:
        pytest.skip(f"no native noise for torch's CPU capability {torch.backends.cpu.get_cpu_capability()}")


# ---------------------------------------------------------------------------------------
# the ops, with coefficients that make z visible at every dtype, and none a power of two
# (a product with one would be exact, and a fused multiply-add would go unnoticed)


def _perturb(t, kind, offset, seed=SEED, **kw):
    perturb_(t["param"], seed, 0.37, kind=kind, offset=offset, master=t.get("master"), **kw)


def _restore(t, kind, offset, seed=SEED, **kw):  # eps, g, lr, wd
    restore_and_update_(t["param"], seed, 0.3, 1.7, 0.1, 0.5, kind=kind, offset=offset, master=t.get("master"), **kw)


def _move(t, kind, offset, seed=SEED, **kw):  # from θ − 0.6·z(seed) to θ + 0.4·z(SEED2)
    move_perturbation_(t["param"], seed, 0.6, SEED2, 0.4, kind=kind, offset=offset, **kw)


def _momentum(t, kind, offset, seed=SEED, **kw):  # g, lr, wd, beta
    momentum_update_(t["param"], t["buf"], seed, 1.7, 0.1, 0.5, 0.9, kind=kind, offset=offset,
                     master=t.get("master"), **kw)


def _adam(t, kind, offset, seed=SEED, **kw):  # g, lr, wd, beta1, beta2, adam_eps, step
    adam_update_(t["param"], t["m"], t["v"], seed, 1.7, 0.1, 0.5, 0.9, 0.99, 1e-3, 3, kind=kind, offset=offset,
                 master=t.get("master"), **kw)


OPS = {"perturb": _perturb, "restore_and_update": _restore, "move_perturbation": _move,
       "momentum": _momentum, "adam": _adam}
STATE = {"momentum": ("buf",), "adam": ("m", "v")}


def make(op, dtype_key, shape_key, gen_seed=0):
    """Fresh tensors for one case: param (+ master) (+ optimizer state), all of one shape."""
    dtype, with_master = DTYPES[dtype_key]
    shape, _, transposed = SHAPES[shape_key]
    gen = torch.Generator().manual_seed(gen_seed)

    def new(dtype, positive=False):
        t = torch.randn(shape, generator=gen)
        t = (t.abs() + 0.1 if positive else t).to(dtype)
        return t.t() if transposed else t

    t = {"param": new(dtype)}
    if with_master and op != "move_perturbation":  # the in-place move runs on weights without one
        t["master"] = new(torch.float32)  # deliberately not param's value: param must not be read
    for name in STATE.get(op, ()):
        t[name] = new(torch.float32, positive=name == "v")
    return t


def run(op, impl, tensors, kind, offset, seed=SEED):
    with kernels_on(impl, tensors) as t:
        OPS[op](t, kind, offset, seed)
    return tensors


def compare(actual, expected, kind, slack=0.0):
    """The tolerance of the table above; both dicts of tensors, compared in row-major order."""
    for name, exp in expected.items():
        assert_kernel_close(actual[name], exp, kind, name, slack)


# ---------------------------------------------------------------------------------------
# the matrix


@pytest.mark.parametrize("shape_key", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype_key", DTYPES)
@pytest.mark.parametrize("impl", [*IMPLS, CUDA_KERNELS])
@pytest.mark.parametrize("op", OPS)
def test_op_matches_twin(op, impl, dtype_key, kind, shape_key):
    needs(impl)
    offset = SHAPES[shape_key][1]
    tensors = make(op, dtype_key, shape_key)
    # the reference runs on contiguous copies, so the non-contiguous case checks the write-back
    expected = run(op, "eager", {k: v.contiguous().clone() for k, v in tensors.items()}, kind, offset)
    actual = run(op, impl, tensors, kind, offset)
    assert actual["param"].shape == expected["param"].shape
    compare(actual, expected, kind, kernel_slack(impl, kind, tensors["param"].numel(), offset))


# Each op with each noise kind, in float32 or with a master taken in turn, so that every pair of (op, dtype, kind)
# is covered: each op meets both dtypes, each kind both dtypes across the ops. Every case compiles graphs of its own,
# so the 30 triples are not all run; and these take the Philox that multiplies in int64 (AVX-512's), whose graphs
# have a third of the int32 one's operations and compile about 3x faster (8 s against 25 s a graph, cold, on an AVX2
# EPYC). The int32 Philox (AVX2's and ARM's) in fused graphs: one case per kind, of single-seed ops
# (move_perturbation's two streams took 41 s of a cold run), a float16 param without a master among them (its
# stochastic rounding compiled: tests/test_kernels_out_of_place.py). torch.compile guards on the flag: a graph of
# the other width is compiled, not reused.
FUSED_DTYPES = ("fp32", "bf16+master")
FUSED_CASES = [*((op, FUSED_DTYPES[(i + j) % 2], kind, "int64") for i, op in enumerate(OPS)
                 for j, kind in enumerate(KINDS)),
               ("perturb", "fp32", "gaussian", "int32"), ("perturb", "bf16+master", "gaussian4x", "int32"),
               ("restore_and_update", "fp16", "rademacher", "int32")]


@pytest.mark.parametrize("op,dtype_key,kind,philox", FUSED_CASES)
def test_fused_compiled_pieces_match_twin(op, dtype_key, kind, philox, monkeypatch):
    """The compiled path's fused graphs (noise + arithmetic + stores, one per full aligned piece),
    made small enough that 41x53@3000 has full pieces between ragged ends: same tolerances, so
    rademacher bit-equal (no FMA contraction in inductor's C++)."""
    monkeypatch.setattr(_fused, "FUSED_SIZES", (256,))
    monkeypatch.setattr(_philox, "HAS_64BIT_VECTOR_MULTIPLY", philox == "int64")
    offset = SHAPES["41x53@3000"][1]
    tensors = make(op, dtype_key, "41x53@3000")
    expected = run(op, "eager", {k: v.clone() for k, v in tensors.items()}, kind, offset)
    actual = run(op, "compiled", tensors, kind, offset)
    compare(actual, expected, kind)


def test_fused_graphs_compile_once_per_combination(monkeypatch):
    """A recompile raises here; the compiled path would catch it and fall back to eager, so the
    fallback's record must stay empty too. Graphs of its own (a graph another test compiled with the other
    Philox would be compiled again here); the int64 Philox, whose graphs compile fastest (see FUSED_CASES)."""
    monkeypatch.setattr(_fused, "FUSED_SIZES", (1024, 256))
    monkeypatch.setattr(_fused, "_graphs", {})
    monkeypatch.setattr(_philox, "HAS_64BIT_VECTOR_MULTIPLY", True)
    monkeypatch.setattr(_philox, "_compile_failed", [])
    t = torch.randn(5000)
    with forced("compiled"), torch._dynamo.config.patch(error_on_recompile=True):
        perturb_(t[:3000], SEED, 0.37, kind="rademacher", offset=0)  # both sizes, then a ragged end
        graphs = len(_fused._graphs)
        for seed, scale, lo, hi, offset in [(SEED2, 0.5, 1000, 4000, 3), (1, -2.0, 7, 3000, 2**33 + 1)]:
            expected = t[lo:hi].clone()
            with forced("eager"):
                perturb_(expected, seed, scale, kind="rademacher", offset=offset)
            perturb_(t[lo:hi], seed, scale, kind="rademacher", offset=offset)
            assert torch.equal(t[lo:hi], expected)
        assert len(_fused._graphs) == graphs
    assert not _philox._compile_failed


def test_fused_compile_failure_falls_back_to_eager(monkeypatch):
    monkeypatch.setattr(_philox, "_compile_failed", [])
    monkeypatch.setattr(_fused, "FUSED_SIZES", (256,))

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(_fused, "_graph", broken)
    p = torch.randn(1000)
    expected = p.clone()
    with forced("eager"):
        perturb_(expected, SEED, 0.37, kind="rademacher", offset=5)
    with forced("compiled"), pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        perturb_(p, SEED, 0.37, kind="rademacher", offset=5)
    assert torch.equal(p, expected)


def implementation_noise(impl, seed, n, offset, kind="gaussian"):
    if impl == "compiled":
        return _philox.noise(seed, n, kind, offset)
    z = torch.zeros(n)
    with kernels_on(impl, {"z": z}) as t:
        perturb_(t["z"], seed, 1.0, kind=kind, offset=offset)  # 0 + 1*z is exact
    return z


@pytest.mark.parametrize("dtype_key", DTYPES)
@pytest.mark.parametrize("impl", [*FAST_IMPLS, CUDA_KERNELS])
@pytest.mark.parametrize("op", OPS)
def test_gaussian_arithmetic_is_bit_equal_given_the_same_z(op, impl, dtype_key, monkeypatch):
    needs(impl)
    shape_key = "41x53@3000"
    shape, offset, _ = SHAPES[shape_key]
    n = torch.Size(shape).numel()
    z = {seed: implementation_noise(impl, seed, n, offset) for seed in (SEED, SEED2)}
    actual = run(op, impl, make(op, dtype_key, shape_key), "gaussian", offset)

    def same_z(seed, numel, kind, start, device):
        return z[seed][start - offset : start - offset + numel].clone()

    monkeypatch.setattr(_philox, "eager_piece", same_z)
    expected = run(op, "eager", make(op, dtype_key, shape_key), "gaussian", offset)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


# ---------------------------------------------------------------------------------------
# the twin against the formulas, in float64


def formula(op, t, z, z2):
    """Expected θ (or param) and state in float64, from the op's definition."""
    src = t["master"] if "master" in t else t["param"]
    src = src.double()
    out = {}
    if op == "perturb":
        theta = src + 0.37 * z
    elif op == "restore_and_update":
        restored = src if "master" in t else src + 0.3 * z  # master holds θ; param is at θ − εz
        theta = restored * (1 - 0.1 * 0.5) - 0.1 * 1.7 * z
    elif op == "move_perturbation":
        return {"param": src + 0.6 * z + 0.4 * z2}
    elif op == "momentum":
        out["buf"] = 0.9 * t["buf"].double() + 1.7 * z
        theta = src * (1 - 0.1 * 0.5) - 0.1 * out["buf"]
    else:
        ghat = 1.7 * z
        out["m"] = 0.9 * t["m"].double() + 0.1 * ghat
        out["v"] = 0.99 * t["v"].double() + 0.01 * ghat**2
        m_hat, v_hat = out["m"] / (1 - 0.9**3), out["v"] / (1 - 0.99**3)
        theta = src * (1 - 0.1 * 0.5) - 0.1 * m_hat / (v_hat.sqrt() + 1e-3)
    if op != "perturb" and "master" in t:
        out["master"] = theta
    out["param"] = theta
    return out


@pytest.mark.parametrize("dtype_key", ["fp32", "bf16+master"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", OPS)
def test_twin_follows_the_formula(op, kind, dtype_key):
    shape, offset, _ = SHAPES["3x5x7@77"]
    t = make(op, dtype_key, "3x5x7@77")
    z = noise(SEED, 105, kind, offset).double().view(shape)  # element i of the row-major flattening
    z2 = noise(SEED2, 105, kind, offset).double().view(shape)
    expected = formula(op, t, z, z2)
    actual = run(op, "eager", t, kind, offset)
    for name, exp in expected.items():
        act = actual[name]
        rtol = 1e-5 if act.dtype == torch.float32 else torch.finfo(act.dtype).eps / 2 + 1e-5
        torch.testing.assert_close(act.double(), exp, rtol=rtol, atol=1e-5, msg=name)
    if op == "perturb" and "master" in t:
        assert torch.equal(actual["master"], make(op, dtype_key, "3x5x7@77")["master"])  # unchanged


def test_adam_matches_torch_adamw():
    lr, wd, betas, adam_eps = 0.01, 0.1, (0.9, 0.999), 1e-6
    theta0 = torch.randn(300, generator=torch.Generator().manual_seed(3))
    ours, m, v = theta0.clone(), torch.zeros(300), torch.zeros(300)
    theirs = theta0.clone().requires_grad_()
    opt = torch.optim.AdamW([theirs], lr=lr, betas=betas, eps=adam_eps, weight_decay=wd, foreach=False)
    for step, g in enumerate([0.7, -1.3, 2.1], start=1):
        with forced("eager"):
            adam_update_(ours, m, v, SEED + step, g, lr, wd, *betas, adam_eps, step, kind="gaussian", offset=11)
        theirs.grad = g * noise(SEED + step, 300, "gaussian", 11)
        opt.step()
    # a few ulp apart: torch updates m by lerp (another rounding order), and its float32 sqrt
    # is not correctly rounded on this CPU (see adam.py)
    torch.testing.assert_close(ours, theirs.detach(), rtol=4 * EPS32, atol=1e-7)
    torch.testing.assert_close(m, opt.state[theirs]["exp_avg"], rtol=4 * EPS32, atol=1e-7)
    torch.testing.assert_close(v, opt.state[theirs]["exp_avg_sq"], rtol=4 * EPS32, atol=1e-9)


def test_momentum_matches_torch_sgd():
    lr, beta = 0.05, 0.9
    theta0 = torch.randn(300, generator=torch.Generator().manual_seed(4))
    ours, buf = theta0.clone(), torch.zeros(300)
    theirs = theta0.clone().requires_grad_()
    opt = torch.optim.SGD([theirs], lr=lr, momentum=beta, foreach=False)
    for step, g in enumerate([0.7, -1.3, 2.1]):
        with forced("eager"):
            momentum_update_(ours, buf, SEED + step, g, lr, 0.0, beta, kind="rademacher")
        theirs.grad = g * noise(SEED + step, 300, "rademacher")
        opt.step()
    torch.testing.assert_close(ours, theirs.detach(), rtol=4 * EPS32, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_move_equals_a_restore_then_a_perturbation(kind):
    """The fused schedule's use: a param at θ − εz_k goes to θ + εz_{k+1} in one pass, within an ulp
    or two of the two `perturb_` passes it replaces."""
    eps = 1e-3
    theta = torch.randn(500, generator=torch.Generator().manual_seed(5))
    at_minus = theta - eps * noise(SEED, 500, kind)
    two_passes, one_pass = at_minus.clone(), at_minus.clone()
    with forced("eager"):
        perturb_(two_passes, SEED, eps, kind=kind)
        perturb_(two_passes, SEED2, eps, kind=kind)
        move_perturbation_(one_pass, SEED, eps, SEED2, eps, kind=kind)
    torch.testing.assert_close(one_pass, two_passes, rtol=0, atol=4 * EPS32 * 4)
    assert not torch.equal(one_pass, at_minus)


# ---------------------------------------------------------------------------------------
# offsets, seeds and shards


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype_key", ["fp32", "bf16+master"])
@pytest.mark.parametrize("shape_key", ["3x5x7@77", "9x5.T@1000"])
@pytest.mark.parametrize("op", OPS)
def test_given_directions_run_the_twin_on_them(op, shape_key, dtype_key, kind):
    """Structured estimators hand the ops z = directions(seed): given the noise itself, the result
    is the eager twin's, bit for bit."""
    plain = make(op, dtype_key, shape_key)
    given = {k: v.clone() for k, v in plain.items()}
    run(op, "eager", plain, kind, 0)
    OPS[op](given, kind, 0, directions=lambda seed: noise_like(given["param"], seed, kind))
    for name in plain:
        assert torch.equal(given[name], plain[name]), name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["perturb", "move_perturbation", "adam"])
def test_shards_equal_the_whole(op, impl, kind):
    needs(impl)
    whole = make(op, "fp32", "41x53@3000")
    flat = {k: v.reshape(-1).clone() for k, v in whole.items()}
    run(op, impl, whole, kind, 40)
    for lo, hi in [(0, 77), (77, 1100), (1100, 2173)]:  # cuts inside 128-element counters
        run(op, impl, {k: v[lo:hi] for k, v in flat.items()}, kind, 40 + lo)
    for name in whole:
        assert torch.equal(whole[name].reshape(-1), flat[name]), name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", [*FAST_IMPLS, CUDA_KERNELS])
def test_a_wrong_seed_or_offset_is_caught(impl, kind):
    """Also shows that the GPU's wider gaussian tolerance still tells a wrong z from a right one."""
    needs(impl)
    expected = run("perturb", "eager", make("perturb", "bf16", "130@2^33+5"), kind, 2**33 + 5)
    slack = kernel_slack(impl, kind, 130, 2**33 + 5)
    compare(run("perturb", impl, make("perturb", "bf16", "130@2^33+5"), kind, 2**33 + 5), expected, kind, slack)
    for seed, offset in [(SEED + 1, 2**33 + 5), (SEED + 2**32, 2**33 + 5), (SEED, 2**33 + 6), (SEED, 5)]:
        wrong = run("perturb", impl, make("perturb", "bf16", "130@2^33+5"), kind, offset, seed=seed)
        with pytest.raises(AssertionError):
            compare(wrong, expected, kind, slack)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed,offset,n", [(SEED, 77, 70_000), (2**64 - 1, 2**39 - 300, 600), (0, 0, 1)])
def test_compiled_noise_matches_eager(kind, seed, offset, n):
    z = _philox.noise(seed, n, kind, offset)  # 70_000 spans three compiled chunks
    if kind == "rademacher":
        assert torch.equal(z, noise(seed, n, kind, offset))  # every bit of the integer stream
    else:
        torch.testing.assert_close(z, noise(seed, n, kind, offset), rtol=8 * EPS32, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed,offset", [(2**64 - 1, 2**39 - 300), (0, 0), (SEED, 2**32 - 100)])
@pytest.mark.parametrize("impl", [pytest.param("triton", marks=pytest.mark.triton), CUDA_KERNELS])
def test_triton_noise_matches_eager(impl, kind, seed, offset):
    needs(impl)
    z = implementation_noise(impl, seed, 600, offset, kind)
    expected = noise(seed, 600, kind, offset)
    if kind == "rademacher":
        assert torch.equal(z, expected)
    elif impl == "triton":
        torch.testing.assert_close(z, expected, rtol=8 * EPS32, atol=0)
    else:
        excess = (z - expected).abs() - fast_math_error(seed, 600, offset, kind)
        assert excess.max() <= 0, f"element {excess.argmax().item()} off by {excess.max().item():.3g} beyond the bound"


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_tensors(impl):
    needs(impl)
    p = torch.zeros(0, 3, dtype=torch.bfloat16)
    with forced(impl):
        assert perturb_(p, SEED, 1.0, kind="gaussian", master=torch.zeros(0, 3)) is p


def test_arguments_are_checked():
    p = torch.zeros(4, dtype=torch.bfloat16)
    with forced("eager"):
        with pytest.raises(ValueError, match="kind"):
            perturb_(p, 0, 1.0, kind="normal")
        with pytest.raises(ValueError, match="offset"):
            perturb_(p, 0, 1.0, kind="gaussian", offset=-1)
        with pytest.raises(ValueError, match="seed"):
            perturb_(p, -1, 1.0, kind="gaussian")
        with pytest.raises(TypeError, match="master"):
            perturb_(p, 0, 1.0, kind="gaussian", master=torch.zeros(4, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="master"):
            perturb_(p, 0, 1.0, kind="gaussian", master=torch.zeros(5))
        with pytest.raises(TypeError, match="param"):
            perturb_(torch.zeros(4, dtype=torch.float64), 0, 1.0, kind="gaussian")
        with pytest.raises(ValueError, match="buf"):
            momentum_update_(p, torch.zeros(2, 2), 0, 1.0, 0.1, 0.0, 0.9, kind="gaussian")
        with pytest.raises(ValueError, match="step"):
            adam_update_(p, torch.zeros(4), torch.zeros(4), 0, 1.0, 0.1, 0.0, 0.9, 0.99, 1e-8, 0, kind="gaussian")


# ---------------------------------------------------------------------------------------
# dispatch


def test_default_dispatch(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert _dispatch.choose(torch.device("cpu")) == ("native" if _native.library() else "compiled")
    assert _dispatch.choose(torch.device("meta")) == "eager"
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    assert _dispatch.choose(torch.device("cuda")) == "triton"
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    assert _dispatch.choose(torch.device("cuda")) == "eager"


def test_env_var_is_checked(monkeypatch):
    monkeypatch.setenv(ENV, "cuda")
    with pytest.raises(ValueError, match=ENV):
        _dispatch.choose(torch.device("cpu"))
    monkeypatch.setenv(ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        perturb_(torch.zeros(3), 0, 1.0, kind="gaussian")


@pytest.mark.parametrize("setting", [None, NATIVE, "compiled", "eager",
                                     pytest.param("triton", marks=pytest.mark.triton)])
def test_ops_use_the_chosen_implementation(setting, monkeypatch):
    """The generators the PyTorch paths call show which path ran (gaussian: rademacher's ragged ends take
    the eager signs on every path, the same bits)."""
    needs(setting)
    calls = []
    for module, name in ((_philox, "noise_piece"), (_philox, "eager_piece"), (_native, "piece"), (_native, "run")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    if setting is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, setting)
    p = torch.zeros(300)
    perturb_(p, SEED, 1.0, kind="gaussian")
    torch.testing.assert_close(p, noise(SEED, 300, "gaussian"))
    default = {"run"} if _native.library() else {"noise_piece"}  # float32: the native op's one pass
    expected = {None: default, "native": {"run"}, "compiled": {"noise_piece"}, "eager": {"eager_piece"},
                "triton": set()}
    assert set(calls) == expected[setting]


def test_compile_failure_falls_back_to_eager(monkeypatch):
    monkeypatch.setattr(_philox, "_compile_failed", [])

    def broken(kind):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(_philox, "_compiled_chunk", broken)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        z = _philox.noise(SEED, 300, "gaussian", 5)
    assert torch.equal(z, noise(SEED, 300, "gaussian", 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert torch.equal(_philox.noise(SEED, 300, "rademacher", 5), noise(SEED, 300, "rademacher", 5))


# ---------------------------------------------------------------------------------------
# the native noise


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed,offset,n", [
    (SEED, 77, 70_000),  # spans the compiled chunks, and the threads
    (2**64 - 1, 2**39 - 300, 600),
    (SEED2, 2**32 - 100, 600),  # the counter's low word wraps inside a vector of counters
    (0, 0, 1), (SEED, 5, 0), (SEED, 2**33 + 5, 37),  # shorter than a vector, and empty
])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_noise_equals_the_compiled_noise_bit_for_bit(kind, seed, offset, n, threads):
    """Same Philox words, same float32 operations in the same order, the same Sleef log and cos: not
    a tolerance but equality (the compiled noise is held to the reference in test_compiled_noise_matches_eager)."""
    needs("native")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        z = _native.piece(seed, n, kind, offset, "cpu")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(z, _philox.noise(seed, n, kind, offset))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape_key", ["41x53@3000", "130@2^33+5", "1@0"])
@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("op", ["perturb", "restore_and_update", "move_perturbation"])
def test_native_one_pass_ops_equal_their_twin_on_the_same_noise(op, with_out, shape_key, kind, monkeypatch):
    """float32 without a master: `_native.run` applies the op in one pass; its arithmetic is the twin's,
    so fed the same z (the twin here takes the native noise piece by piece) every bit agrees."""
    needs("native")
    if with_out and op != "perturb":
        pytest.skip(f"{op}_ has no out=")
    offset = SHAPES[shape_key][1]
    tensors = make(op, "fp32", shape_key)
    if with_out:
        tensors["out"] = torch.full_like(tensors["param"], float("nan"))
    twin = {k: v.clone() for k, v in tensors.items()}
    with forced("native"):
        OPS[op](tensors, kind, offset, **({"out": tensors["out"]} if with_out else {}))
        monkeypatch.setattr(_native, "run", lambda *args: False)  # the twin's eager arithmetic, native noise
        OPS[op](twin, kind, offset, **({"out": twin["out"]} if with_out else {}))
    for name in tensors:
        assert torch.equal(tensors[name], twin[name]), name


def test_native_one_pass_ops_take_float32_without_a_master_only():
    needs("native")
    p = torch.zeros(300)
    assert _native.run("perturb", {"param": p, "master": None, "out": None}, (SEED,), "gaussian", 0, (0.5,))
    assert torch.equal(p, 0.5 * _philox.noise(SEED, 300, "gaussian"))
    for tensors in ({"param": p.bfloat16(), "master": None, "out": None},
                    {"param": p.bfloat16(), "master": p.clone(), "out": None},
                    {"param": p, "master": None, "out": p.half()}):
        assert not _native.run("perturb", tensors, (SEED,), "gaussian", 0, (0.5,))
    assert not _native.run("adam", {"param": p, "master": None}, (SEED,), "gaussian", 0, (0.5,))


@pytest.fixture
def native_in(tmp_path, monkeypatch):
    """The native library built afresh into ``tmp_path``'s cache, and forgotten again afterwards."""
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path))
    _native.library.cache_clear()
    yield tmp_path / "native"
    _native.library.cache_clear()


def test_the_native_library_is_built_once_and_reused(native_in):
    needs("native")
    assert _native.library() is not None
    (built,) = native_in.iterdir()
    stamp = built.stat().st_mtime_ns
    _native.library.cache_clear()
    assert _native.library() is not None
    assert [p.name for p in native_in.iterdir()] == [built.name] and built.stat().st_mtime_ns == stamp


def test_without_a_compiler_the_compiled_path_serves(native_in, monkeypatch):
    needs("native")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.delenv(ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="no C compiler '/nonexistent/cc'"):
        assert _native.library() is None
    assert _dispatch.choose(torch.device("cpu")) == "compiled"
    with pytest.raises(RuntimeError, match="native noise cannot run here"), forced("native"):
        _dispatch.choose(torch.device("cpu"))
    p = torch.zeros(300)
    perturb_(p, SEED, 1.0, kind="gaussian")
    assert torch.equal(p, _philox.noise(SEED, 300, "gaussian"))


def test_import_and_eager_ops_do_not_import_triton():
    code = (
        "import os, sys, torch, zotune, zotune.optim, zotune.kernels\n"
        "from zotune.kernels import perturb_, restore_and_update_, move_perturbation_, momentum_update_, "
        "adam_update_\n"
        "assert 'triton' not in sys.modules, 'import'\n"
        "os.environ['ZOTUNE_KERNELS'] = 'eager'\n"
        "perturb_(torch.zeros(10), 1, 1.0, kind='gaussian')\n"
        "assert 'triton' not in sys.modules, 'eager op'\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ENV)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
