"""zotune.kernels out of place (DESIGN §3, "θ never moves except by its update"): ``out=`` of
perturb_, perturb_rows, zotune.noise.noise_at, and stochastic
rounding (``rounding_seed``) of 16-bit updates.

Tolerances are test_kernels.py's table: rademacher bit-equal everywhere; gaussian abs 1e-5 for
float32 outputs and abs 1e-5 + 1 ulp of the dtype for 16-bit ones (z's last bits differ between
implementations, which can flip a final rounding, stochastic or to nearest, by one ulp). The
stochastic-rounding bits are an integer stream: bit-equal in every implementation. Triton compiled
for a GPU (triton-cuda) adds conftest.kernel_slack to the gaussian tolerance.
"""

import math

import pytest
import torch
from conftest import FAST_KERNEL_IMPLS as FAST_IMPLS
from conftest import KERNEL_DTYPES as DTYPES
from conftest import KERNEL_IMPLS as IMPLS
from conftest import CUDA_KERNELS, KERNEL_SEEDS, TRITON_CUDA
from conftest import assert_kernel_close, kernel_slack, kernels_on
from conftest import forced_kernels as forced

from zotune.kernels import _dispatch, _fused, _philox, _rounding, perturb_, perturb_rows, restore_and_update_
from zotune.noise import KINDS, noise, noise_at, noise_like

SEED, SEED2 = KERNEL_SEEDS
RSEED = 2**63 + 12345  # a rounding seed past 2**63
SHAPES = {  # name -> (shape, offset, transposed view)
    "130@2^33+5": ((130,), 2**33 + 5, False),  # counters past 2**32
    "9x5.T@1000": ((9, 5), 1000, True),  # non-contiguous
    "41x53@3000": ((41, 53), 3000, False),  # 3 Triton programs
}
OTHER_DTYPE = {torch.float32: torch.bfloat16, torch.bfloat16: torch.float16, torch.float16: torch.float32}


def needs(impl):
    if impl in ("triton", TRITON_CUDA):
        pytest.importorskip("triton")


def make(dtype_key, shape_key, gen_seed=0):
    """param (+ master, deliberately not param's value), of one shape."""
    dtype, with_master = DTYPES[dtype_key]
    shape, _, transposed = SHAPES[shape_key]
    gen = torch.Generator().manual_seed(gen_seed)

    def new(dtype):
        t = torch.randn(shape, generator=gen).to(dtype)
        return t.t() if transposed else t

    t = {"param": new(dtype)}
    if with_master:
        t["master"] = new(torch.float32)
    return t


def clone(t):
    return {k: v.clone() for k, v in t.items()}


def assert_unchanged(t, before):
    """Bit for bit (NaN payloads and signed zeros included)."""
    def bits(x):
        return x.contiguous().reshape(-1).view(torch.uint8)

    for name in before:
        assert torch.equal(bits(t[name]), bits(before[name])), f"{name} moved"


# ---------------------------------------------------------------------------------------
# noise_at


@pytest.mark.parametrize("kind", KINDS)
def test_noise_at_matches_noise_at_random_offsets(kind):
    gen = torch.Generator().manual_seed(1)
    index = torch.cat([torch.randint(0, 2**62, (40,), generator=gen), torch.randint(0, 1000, (40,), generator=gen),
                       torch.tensor([0, 127, 128, 2**32 - 1, 2**32, 2**39 - 300, 5, 5])])
    z = noise_at(SEED, index.view(8, -1), kind)
    assert z.shape == (8, index.numel() // 8) and z.dtype == torch.float32
    expected = torch.stack([noise(SEED, 1, kind, offset=int(i))[0] for i in index])
    assert torch.equal(z.reshape(-1), expected)  # the same float32 ops, element by element
    start = 2**33 + 70  # and a contiguous run equals noise's run (rademacher counters split)
    assert torch.equal(noise_at(SEED2, torch.arange(start, start + 300), kind), noise(SEED2, 300, kind, start))


# ---------------------------------------------------------------------------------------
# perturb_(..., out=)


def perturb_out(t, out, kind, offset, **kw):
    return perturb_(t["param"], SEED, 0.37, kind=kind, offset=offset, master=t.get("master"), out=out, **kw)


@pytest.mark.parametrize("same_dtype", [True, False], ids=["out=param.dtype", "out=other"])
@pytest.mark.parametrize("shape_key", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype_key", DTYPES)
@pytest.mark.parametrize("impl", [*IMPLS, CUDA_KERNELS])
def test_perturb_out_matches_twin_and_leaves_theta(impl, dtype_key, kind, shape_key, same_dtype):
    needs(impl)
    offset = SHAPES[shape_key][1]
    t = make(dtype_key, shape_key)
    before = clone(t)
    out_dtype = t["param"].dtype if same_dtype else OTHER_DTYPE[t["param"].dtype]
    shape = t["param"].shape
    ref = clone({k: v.contiguous() for k, v in t.items()})
    with forced("eager"):
        expected = perturb_out(ref, torch.empty(shape, dtype=out_dtype), kind, offset)
    out = torch.full(shape, float("nan"), dtype=out_dtype)
    if SHAPES[shape_key][2]:
        out = torch.full(shape[::-1], float("nan"), dtype=out_dtype).t()  # a non-contiguous out, too
    with kernels_on(impl, {**t, "out": out}) as on:
        assert perturb_out(on, on["out"], kind, offset) is on["out"]
    assert_unchanged(t, before)
    assert_kernel_close(out, expected, kind, slack=kernel_slack(impl, kind, out.numel(), offset))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype_key", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_perturb_out_equals_the_in_place_result(impl, dtype_key, kind):
    """Within one implementation (the same z), out of place = in place on a copy, bit for bit."""
    needs(impl)
    offset = SHAPES["41x53@3000"][1]
    t = make(dtype_key, "41x53@3000")
    in_place = clone(t)
    with forced(impl):
        out = perturb_out(t, torch.empty_like(t["param"]), kind, offset)
        perturb_out(in_place, None, kind, offset)
    assert torch.equal(out, in_place["param"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype_key", ["fp32", "bf16+master"])
@pytest.mark.parametrize("impl", IMPLS)
def test_perturb_out_row_slices_equal_the_whole(impl, dtype_key, kind):
    """A Linear applied in chunks of output rows: slices of rows with offset = base + row0·row_numel."""
    needs(impl)
    base = 2**33 + 5
    t = make(dtype_key, "41x53@3000")
    whole = torch.empty(41, 53, dtype=torch.float16)
    pieces = torch.empty(41, 53, dtype=torch.float16)
    with forced(impl):
        perturb_out(t, whole, kind, base)
        for lo, hi in [(0, 2), (2, 30), (30, 41)]:  # cuts inside 128-element counters
            perturb_out({k: v[lo:hi] for k, v in t.items()}, pieces[lo:hi], kind, base + lo * 53)
    assert torch.equal(pieces, whole)


def test_fused_compiled_pieces_with_out_match_twin(monkeypatch):
    """The compiled path's fused graphs with an out tensor (small pieces so that full ones occur); the
    int64 Philox, whose graphs compile fastest (tests/test_kernels.py's FUSED_CASES)."""
    monkeypatch.setattr(_fused, "FUSED_SIZES", (256,))
    monkeypatch.setattr(_philox, "HAS_64BIT_VECTOR_MULTIPLY", True)
    offset = SHAPES["41x53@3000"][1]
    t = make("bf16+master", "41x53@3000")
    before = clone(t)
    with forced("eager"):
        expected = perturb_out(clone(t), torch.empty(41, 53), "rademacher", offset)
    with forced("compiled"):
        actual = perturb_out(t, torch.empty(41, 53), "rademacher", offset)
    assert_unchanged(t, before)
    assert torch.equal(actual, expected)


def test_out_is_checked():
    p = torch.zeros(4, 3, dtype=torch.bfloat16)
    with forced("eager"):
        with pytest.raises(ValueError, match="out"):
            perturb_(p, 0, 1.0, kind="gaussian", out=torch.zeros(3, 4))
        with pytest.raises(TypeError, match="out"):
            perturb_(p, 0, 1.0, kind="gaussian", out=torch.zeros(4, 3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# perturb_rows

ROW_CASES = {  # name -> (param shape, offset)
    "41x53@3000": ((41, 53), 3000),
    "300x7@2^33+5": ((300, 7), 2**33 + 5),  # odd rows: counters split across rows, past 2**32
    "6x3x4@77": ((6, 3, 4), 77),  # rows of a 3-D tensor
    "130@2^39-300": ((130,), 2**39 - 300),  # 1-D: rows of one element
}


def some_rows(n, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    return torch.cat([torch.randint(0, n, (19,), generator=gen), torch.tensor([n - 1, 0, n - 1, 3 % n])])


@pytest.mark.parametrize("case", ROW_CASES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("impl", [*IMPLS, CUDA_KERNELS])
def test_perturb_rows_equals_the_gathered_whole(impl, dtype, kind, case):
    needs(impl)
    shape, offset = ROW_CASES[case]
    param = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    before = param.clone()
    rows = some_rows(shape[0])
    with forced("eager"):
        expected = perturb_(param.clone(), SEED, 0.37, kind=kind, offset=offset)[rows]
    with kernels_on(impl, {"param": param, "rows": rows}) as on:
        actual = perturb_rows(on["param"], on["rows"], SEED, 0.37, kind=kind, offset=offset).cpu()
    assert actual.shape == (rows.numel(), *shape[1:]) and actual.dtype == dtype
    assert torch.equal(param, before)
    slack = kernel_slack(impl, kind, param.numel(), offset)
    if torch.is_tensor(slack):  # the gathered rows' elements
        slack = slack.reshape(shape)[rows].reshape(-1)
    assert_kernel_close(actual, expected, kind, slack=slack)
    assert torch.equal(actual[19], actual[21])  # a repeated row: the same values


@pytest.mark.parametrize("impl", IMPLS)
def test_perturb_rows_of_nothing(impl):
    needs(impl)
    with forced(impl):
        empty = perturb_rows(torch.randn(5, 3), torch.zeros(0, dtype=torch.int64), SEED, 1.0, kind="gaussian")
    assert empty.shape == (0, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_perturb_rows_with_directions_gathers_them(kind):
    param = torch.randn(9, 5)
    rows = torch.tensor([8, 1, 1, 4])
    plain = perturb_rows(param, rows, SEED, 0.37, kind=kind)
    given = perturb_rows(param, rows, SEED, 0.37, kind=kind, directions=lambda s: noise_like(param, s, kind))
    with forced("eager"):
        assert torch.equal(given, perturb_rows(param, rows, SEED, 0.37, kind=kind))
    assert_kernel_close(plain, given, kind)


def test_perturb_rows_arguments_are_checked():
    p = torch.zeros(4, 3)
    with pytest.raises(TypeError, match="rows"):
        perturb_rows(p, torch.tensor([1, 2], dtype=torch.int32), 0, 1.0, kind="gaussian")
    with pytest.raises(IndexError, match="rows"):
        perturb_rows(p, torch.tensor([4]), 0, 1.0, kind="gaussian")
    with pytest.raises(IndexError, match="rows"):
        perturb_rows(p, torch.tensor([-1]), 0, 1.0, kind="gaussian")
    with pytest.raises(ValueError, match="kind"):
        perturb_rows(p, torch.tensor([1]), 0, 1.0, kind="normal")


# ---------------------------------------------------------------------------------------
# stochastic rounding


def restore(t, kind, offset, rounding_seed=None):  # eps, g, lr, wd
    return restore_and_update_(t["param"], SEED, 0.3, 1.7, 0.1, 0.5, kind=kind, offset=offset, master=t.get("master"),
                               rounding_seed=rounding_seed)


@pytest.mark.parametrize("shape_key", ["41x53@3000", "130@2^33+5", "9x5.T@1000"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype_key", ["bf16", "fp16"])
@pytest.mark.parametrize("impl", [*IMPLS, CUDA_KERNELS])
def test_stochastic_rounding_matches_twin(impl, dtype_key, kind, shape_key):
    needs(impl)
    offset = SHAPES[shape_key][1]
    t = make(dtype_key, shape_key)
    ref = clone({k: v.contiguous() for k, v in t.items()})
    with forced("eager"):
        restore(ref, kind, offset, rounding_seed=RSEED)
    with kernels_on(impl, t) as on:
        restore(on, kind, offset, rounding_seed=RSEED)
    assert_kernel_close(t["param"], ref["param"], kind, slack=kernel_slack(impl, kind, t["param"].numel(), offset))


def test_fused_compiled_pieces_round_like_the_twin(monkeypatch):
    """The rounding bits generated inside the compiled graphs (and the float16 rounding, the more
    intricate one, compiled): bit-equal to the eager twin's. One graph only: compiling is slow."""
    monkeypatch.setattr(_fused, "FUSED_SIZES", (256,))
    offset = SHAPES["41x53@3000"][1]
    t = make("fp16", "41x53@3000")
    t["param"].mul_(2.0**-12)  # float16 subnormals too
    ref = clone(t)
    with forced("eager"):
        restore(ref, "rademacher", offset, rounding_seed=RSEED)
    with forced("compiled"):
        restore(t, "rademacher", offset, rounding_seed=RSEED)
    assert torch.equal(t["param"], ref["param"])


def every_magnitude(dtype):
    """Values of ``dtype`` over its whole range: normal, subnormal (fp16), the smallest, the largest,
    zeros, infinities, NaN, both signs."""
    finfo = torch.finfo(dtype)
    lo = math.log2(finfo.smallest_normal) - (10 if dtype == torch.float16 else 0)
    mags = torch.exp2(torch.linspace(lo, math.log2(finfo.max), 700))
    special = torch.tensor([0.0, finfo.tiny, 2.0**-24, 3 * 2.0**-24, finfo.max, 2.0**-14, float("inf"), float("nan")])
    values = torch.cat([mags, special]).to(dtype)
    return torch.cat([values, -values])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("impl", [*FAST_IMPLS, CUDA_KERNELS])
def test_stochastic_rounding_is_bit_equal_on_every_magnitude(impl, dtype):
    """x = value·0.7 (ε = g = 0 isolates the rounding) over the dtype's whole range: Triton's uint32
    rounding, the compiled graph's int64 one and the twin agree bit for bit (overflow to inf,
    fp16 subnormals and values below the smallest subnormal included)."""
    needs(impl)
    param = every_magnitude(dtype)
    expected = param.clone()
    with forced("eager"):
        restore_and_update_(expected, SEED, 0.0, 0.0, 0.3, 1.0, kind="rademacher", offset=2**35, rounding_seed=RSEED)
    with kernels_on(impl, {"param": param}) as on:
        restore_and_update_(on["param"], SEED, 0.0, 0.0, 0.3, 1.0, kind="rademacher", offset=2**35,
                            rounding_seed=RSEED)
    assert torch.equal(param.isnan(), expected.isnan())
    assert torch.equal(param[~param.isnan()], expected[~expected.isnan()])


def reference_rounding(x: float, r: int, dtype) -> float:
    """The definition in float64: round |x| up to the next grid point iff r + dropped·2**32 >= 2**32,
    dropped = the fraction of a grid step below |x| (truncated to 32 bits)."""
    if math.isnan(x) or math.isinf(x) or x == 0:
        return x
    mant = 7 if dtype == torch.bfloat16 else 10
    e = math.floor(math.log2(abs(x)))
    while 2.0**e > abs(x):  # guard log2's rounding
        e -= 1
    while 2.0 ** (e + 1) <= abs(x):
        e += 1
    # subnormals: bfloat16's are float32's (grid 2**-133), float16's have the grid 2**-24
    step = 2.0 ** (max(e, -126) - mant) if dtype == torch.bfloat16 else 2.0 ** max(e - mant, -24)
    below = math.floor(abs(x) / step) * step
    dropped = math.floor((abs(x) - below) / step * 2**32)
    y = below + step if r + dropped >= 2**32 else below
    return math.copysign(y, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_stochastic_rounding_follows_its_definition(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(300, generator=gen) * torch.exp2(torch.randint(-40, 16, (300,), generator=gen)),
                   torch.tensor([2.0**-25 * 1.5, 2.0**-30 + 2.0**-40, 2.0**-38, 1e-45, 7e4, 65519.0, 1.0 + 2**-20])])
    x = torch.cat([x, -x])
    r = torch.randint(0, 2**32, x.shape, generator=gen)
    r[:4] = torch.tensor([0, 2**32 - 1, 2**31, 1])
    y = _rounding.stochastic(x, r, dtype)
    expected = torch.tensor([reference_rounding(a, b, dtype) for a, b in zip(x.tolist(), r.tolist())],
                            dtype=torch.float64)
    assert torch.equal(y.double(), expected)
    stored = y.to(dtype)  # exact in dtype (inf beyond its largest value)
    assert torch.equal(stored.double(), torch.where(expected.abs() > torch.finfo(dtype).max,
                                                    expected.sign() * math.inf, expected))


def rounded_many(value: float, decay: float, dtype, n=4096, seeds=4, impl="compiled"):
    """round(value·decay) over n elements × ``seeds`` rounding seeds: ε = g = 0, so the op computes
    exactly x = f32(value)·f32(decay); returns (results as float64, x)."""
    lr, wd = 1.0, 1.0 - decay
    results = []
    with forced(impl):
        for k in range(seeds):
            p = torch.full((n,), value, dtype=dtype)
            restore_and_update_(p, SEED, 0.0, 0.0, lr, wd, kind="rademacher", offset=k, rounding_seed=1000 + k)
            results.append(p.double())
    x = torch.tensor(value, dtype=dtype).float() * _dispatch.f32(1.0 - lr * wd)
    return torch.cat(results), x.double().item()


@pytest.mark.parametrize("value,decay,dtype", [
    (1.0, 0.9993, torch.bfloat16),  # bf16 normal, below 1: ulp 2**-8
    (-3.3, 1.0017, torch.bfloat16),  # negative, rounding up in magnitude
    (1.7, 0.9997, torch.float16),  # fp16 normal
    (3 * 2.0**-24, 0.7, torch.float16),  # fp16 subnormal: grid 2**-24
    (2.0**-24, 0.3, torch.float16),  # below the smallest subnormal: rounds to 0 or 2**-24
], ids=["bf16", "bf16-neg", "fp16", "fp16-subnormal", "fp16-tiny"])
def test_stochastic_rounding_is_unbiased(value, decay, dtype):
    results, x = rounded_many(value, decay, dtype)
    lo, hi = results.min().item(), results.max().item()
    assert lo < x < hi and set(results.unique().tolist()) == {lo, hi}  # the two neighbours only
    p = (x - lo) / (hi - lo)  # P(up), by the definition
    standard_error = (hi - lo) * math.sqrt(p * (1 - p) / results.numel())
    assert abs(results.mean().item() - x) <= 5 * standard_error
    nearest = torch.tensor(x, dtype=torch.float32).to(dtype).double().item()
    assert abs(results.mean().item() - x) < abs(nearest - x) / 3  # round-to-nearest is biased here


@pytest.mark.parametrize("value,decay,dtype", [(1.5, 1.0, torch.bfloat16), (-1.25, 0.5, torch.bfloat16),
                                               (3 * 2.0**-24, 1.0, torch.float16), (6.0, 0.5, torch.float16),
                                               (0.0, 0.9, torch.float16)])
def test_an_exactly_representable_result_is_never_changed(value, decay, dtype):
    results, x = rounded_many(value, decay, dtype, n=1024)
    assert (results == x).all()


def test_a_tiny_update_moves_the_mean():
    """1 − 2**-12 is far below half an ulp (2**-9) from 1.0 in bfloat16: rounded to nearest the update
    vanishes; rounded stochastically it moves the mean (down with probability 2**-12 / 2**-8)."""
    results, x = rounded_many(1.0, 1 - 2**-12, torch.bfloat16)
    assert x == 1 - 2**-12
    p = torch.ones(4096, dtype=torch.bfloat16)
    restore_and_update_(p, SEED, 0.0, 0.0, 1.0, 2**-12, kind="rademacher")
    assert (p == 1).all()  # to nearest: no move at all
    standard_error = 2**-8 * math.sqrt(1 / 16 * 15 / 16 / results.numel())
    assert results.mean().item() < 1 - 5 * standard_error
    assert abs(results.mean().item() - x) <= 5 * standard_error


@pytest.mark.parametrize("impl", IMPLS)
def test_the_rounding_seed_decides(impl):
    """The same seed and offset reproduce the rounding; another seed or offset changes decisions."""
    needs(impl)

    def rounded(rounding_seed, offset=0):
        p = torch.full((2048,), 1.0, dtype=torch.bfloat16)
        with forced(impl):
            return restore_and_update_(p, SEED, 0.0, 0.0, 1.0, 2**-9, kind="rademacher", offset=offset,
                                       rounding_seed=rounding_seed)  # P(down) = 1/2

    first = rounded(RSEED)
    assert 0 < (first != 1).sum() < 2048
    assert torch.equal(rounded(RSEED), first)
    assert not torch.equal(rounded(RSEED + 1), first)
    assert not torch.equal(rounded(RSEED + 2**32), first)  # the key's high word
    assert not torch.equal(rounded(RSEED, offset=1), first)


@pytest.mark.parametrize("impl", ["compiled", "eager"])
def test_stochastic_rounding_with_directions(impl):
    """Given directions, the eager twin runs on them with the same rounding bits."""
    t = make("bf16", "41x53@3000")
    given = clone(t)
    with forced(impl):
        restore(t, "rademacher", 0, rounding_seed=RSEED)
    restore_and_update_(given["param"], SEED, 0.3, 1.7, 0.1, 0.5, kind="rademacher", rounding_seed=RSEED,
                        directions=lambda s: noise_like(given["param"], s, "rademacher"))
    assert torch.equal(given["param"], t["param"])


def test_rounding_seed_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="16-bit params without a master"):
        restore_and_update_(torch.zeros(4), SEED, 0.1, 1.0, 0.1, 0.0, kind="gaussian", rounding_seed=1)
    with pytest.raises(ValueError, match="16-bit params without a master"):
        restore_and_update_(torch.zeros(4, dtype=torch.bfloat16), SEED, 0.1, 1.0, 0.1, 0.0, kind="gaussian",
                            master=torch.zeros(4), rounding_seed=1)
    with pytest.raises(ValueError, match="rounding_seed"):
        restore_and_update_(torch.zeros(4, dtype=torch.float16), SEED, 0.1, 1.0, 0.1, 0.0, kind="gaussian",
                            rounding_seed=-1)
