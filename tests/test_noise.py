"""The eager noise reference: Philox known answers, agreement with Triton, chunking, seeds."""

import os
import subprocess
import sys

import pytest
import torch

from zotune import noise as nz
from zotune.noise import noise, noise_like, philox4x32, seed_for, step_seed

try:  # conftest.py has set TRITON_INTERPRET=1 before this import
    import triton
    import triton.language as tl
except ImportError:  # the Triton tests skip themselves through pytest.importorskip
    triton = None

MASK32 = 0xFFFFFFFF
EPS32 = torch.finfo(torch.float32).eps

# Random123's published known answers: DEShawResearch/random123, tests/kat_vectors
# (lines "philox4x32 R ctr0 ctr1 ctr2 ctr3 key0 key1   out0 out1 out2 out3").
KAT = [
    (10, (0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    (7, (0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
]


def kat_seed(key):
    return key[0] | key[1] << 32  # Triton's mapping: key = (seed low word, seed high word)


def counters_of(index: torch.Tensor) -> torch.Tensor:
    """Counters (i_lo, i_hi, 0, 0) of a 64-bit index, as (n, 4) int64."""
    zero = torch.zeros_like(index)
    return torch.stack([index & MASK32, index >> 32, zero, zero], dim=-1)


# ---------------------------------------------------------------------------------------
# Philox


@pytest.mark.parametrize("rounds,ctr,key,expected", KAT)
def test_philox_known_answers(rounds, ctr, key, expected):
    out = philox4x32(torch.tensor([ctr], dtype=torch.int64), kat_seed(key), rounds=rounds)
    assert out.dtype == torch.int64
    assert [f"{w:08x}" for w in out[0].tolist()] == [f"{w:08x}" for w in expected]


def test_philox_is_elementwise_over_batch_shape():
    gen = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 1 << 32, (2, 3, 4), generator=gen, dtype=torch.int64)
    seed = 0xA4093822_299F31D0
    batched = philox4x32(counters, seed)
    assert batched.shape == (2, 3, 4)
    assert int(batched.min()) >= 0 and int(batched.max()) <= MASK32
    rows = torch.stack([philox4x32(c[None], seed)[0] for c in counters.reshape(-1, 4)])
    assert torch.equal(batched.reshape(-1, 4), rows)


@pytest.mark.parametrize("seed", [0, 2**32 - 1, 2**40 + 3, 2**63 - 1])
def test_the_int32_philox_of_the_compiled_path_gives_the_same_bits(seed):
    from zotune.kernels._philox import _philox32

    counters = torch.randint(0, 2**32, (4, 20_000), generator=torch.Generator().manual_seed(seed % 997))
    counters[:, :4] = torch.tensor([[0, MASK32, 2**31 - 1, 2**31]] * 4)  # the edges of the sign bit
    as32 = lambda v: (torch.as_tensor(v) & MASK32).to(torch.int32)  # noqa: E731
    got = _philox32(*map(as32, counters), *map(as32, nz._key(seed)))
    for word, expected in zip(got, nz._philox(*counters, *nz._key(seed))):
        assert torch.equal(word.to(torch.int64) & MASK32, expected)


COMPILED_UNDER_AVX2 = """
import torch
from zotune import noise as nz
from zotune.kernels import _fused, _native, _philox, _rounding, restore_and_update_
assert not _philox.HAS_64BIT_VECTOR_MULTIPLY, torch.backends.cpu.get_cpu_capability()
seed, start, n = 2**40 + 7, 2**33 - 1000, 3 * (1 << 15) + 77
assert torch.equal(_philox.noise(seed, n, "rademacher", start), nz.noise(seed, n, "rademacher", start))
torch.testing.assert_close(_philox.noise(seed, n, "gaussian", start), nz.noise(seed, n, "gaussian", start),
                           rtol=8 * torch.finfo(torch.float32).eps, atol=1e-6)
# the native noise built for AVX2: the compiled noise's bits
assert _native.capability() == "AVX2", _native.capability()
for kind in ("gaussian", "rademacher"):
    assert torch.equal(_native.piece(seed, n, kind, start, "cpu"), _philox.noise(seed, n, kind, start)), kind
k = torch.tensor([seed & 0xFFFFFFFF, seed >> 32])
bits = torch.compile(_philox._bits_chunk, fullgraph=True)(torch.tensor(start), k[0], k[1])
assert torch.equal(bits, _rounding.bits(seed, 1 << 15, start, "cpu"))
x = torch.randint(0, 2**32, (4096,))
assert torch.equal(torch.compile(nz._uniform, fullgraph=True)(x), nz._uniform(x))  # int64 words: the where
# float16 stochastic rounding in a fused graph (its int64 wheres), against the eager twin
_fused.FUSED_SIZES = (256,)
param = (torch.randn(2173, generator=torch.Generator().manual_seed(0)) * 2.0**-12).half()
rounded = {}
for impl in ("eager", "compiled"):
    rounded[impl] = param.clone()
    _fused.run("restore", lambda zs, t, c: {"param": _rounding.to_param(t["param"].float() + c[0] * zs[0], t)},
               {"param": rounded[impl]}, (seed,), "rademacher", 3000, (1e-3,), impl, rounding_seed=12345)
assert torch.equal(rounded["compiled"], rounded["eager"]), int((rounded["compiled"] != rounded["eager"]).sum())
assert not _philox._compile_failed, _philox._compile_failed
"""


def test_compiled_noise_under_avx2_equals_the_reference(tmp_path):
    """Where the CPU has no 64-bit vector multiply the compiled Philox is int32 (AVX2: forced here on an
    AVX-512 CPU too; there the kernel tests check the int64 one): the reference's integers, rademacher
    and the rounding bits bit-equal, gaussian within its tolerance; the native noise built for AVX2
    equals it bit for bit. Forced on an AVX-512 CPU, torch 2.13
    compiles >= and <= of int64 in a `where` wrong (AVX2 vector code under its -march=native): the int64
    uniform, and float16 stochastic rounding in a fused graph, stay bit-equal to the eager twin.
    On an AVX2 CPU the kernel tests run all of this in process (tests/test_kernels.py: the int32 Philox
    compiled, the native AVX2 noise against it, float16's rounding in a fused graph), so the forced run is
    left to AVX-512 CPUs."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        pytest.skip(f"AVX2 is forced from AVX-512 only (torch's capability here: {capability}; on AVX2 the kernel "
                    "tests check this code in process)")
    # a compile cache of its own: torch 2.13 does not key its cache on ATEN_CPU_CAPABILITY, and a process
    # that loaded kernels compiled for the other capability corrupted its heap
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path),
           "ZOTUNE_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", COMPILED_UNDER_AVX2], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_philox_rejects_bad_input():
    with pytest.raises(ValueError):
        philox4x32(torch.zeros(3, dtype=torch.int64), 0)
    with pytest.raises(ValueError):
        philox4x32(torch.zeros(1, 4, dtype=torch.int32), 0)
    with pytest.raises(ValueError):
        philox4x32(torch.zeros(1, 4, dtype=torch.int64), 1 << 64)


# ---------------------------------------------------------------------------------------
# Triton, under the interpreter

if triton is not None:

    @triton.jit
    def _philox_kernel(seed, ctr_ptr, out_ptr, N: tl.constexpr):
        j = tl.arange(0, N)
        c0 = tl.load(ctr_ptr + 4 * j)
        c1 = tl.load(ctr_ptr + 4 * j + 1)
        c2 = tl.load(ctr_ptr + 4 * j + 2)
        c3 = tl.load(ctr_ptr + 4 * j + 3)
        x0, x1, x2, x3 = tl.philox(seed, c0, c1, c2, c3)
        tl.store(out_ptr + 4 * j, x0.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 4 * j + 1, x1.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 4 * j + 2, x2.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 4 * j + 3, x3.to(tl.int32, bitcast=True))

    @triton.jit
    def _stream_kernel(seed, base, ints_ptr, normal_ptr, N: tl.constexpr):
        j = tl.arange(0, N)
        offs = base.to(tl.int64) + j  # 64-bit offsets: randint4x then fills the counter's 2nd word
        x0, x1, x2, x3 = tl.randint4x(seed, offs)
        tl.store(ints_ptr + 4 * j, x0.to(tl.int32, bitcast=True))
        tl.store(ints_ptr + 4 * j + 1, x1.to(tl.int32, bitcast=True))
        tl.store(ints_ptr + 4 * j + 2, x2.to(tl.int32, bitcast=True))
        tl.store(ints_ptr + 4 * j + 3, x3.to(tl.int32, bitcast=True))
        tl.store(normal_ptr + j, tl.randn(seed, offs))


    @triton.jit
    def _randn4x_kernel(seed, base, out_ptr, N: tl.constexpr):
        j = tl.arange(0, N)
        n0, n1, n2, n3 = tl.randn4x(seed, base.to(tl.int64) + j)
        tl.store(out_ptr + 4 * j, n0)
        tl.store(out_ptr + 4 * j + 1, n1)
        tl.store(out_ptr + 4 * j + 2, n2)
        tl.store(out_ptr + 4 * j + 3, n3)


def triton_streams(seed, base, n):
    """tl.randint4x and tl.randn at offsets base .. base+n-1, as (n, 4) int64 and (n,) float32."""
    block = triton.next_power_of_2(n)  # tl.arange needs a power of two
    ints = torch.zeros(block, 4, dtype=torch.int32)
    normals = torch.zeros(block, dtype=torch.float32)
    _stream_kernel[(1,)](seed, base, ints, normals, N=block)
    return ints[:n].to(torch.int64) & MASK32, normals[:n]


# At this seed and index, word 0 is 0xffffffbd: its uniform, 3.1e-8, is clamped to 1e-7.
CLAMPED_SEED, CLAMPED_INDEX = 2**40 + 12345, 23093041

# seeds >= 2**32 make the key's high word matter; bases past 2**32 the counter's second word
STREAM_CASES = [(0, 0), (2**40 + 12345, 77), (2**63 - 1, 2**32 - 1000), (0x5EED_0000_0001, 5 * 2**32 + 3),
                (CLAMPED_SEED, CLAMPED_INDEX - 1001)]


@pytest.mark.triton
@pytest.mark.parametrize("rounds,ctr,key,expected", KAT[:3])
def test_triton_philox_known_answers(rounds, ctr, key, expected):
    pytest.importorskip("triton")
    out = torch.zeros(1, 4, dtype=torch.int32)
    _philox_kernel[(1,)](kat_seed(key), torch.tensor([ctr], dtype=torch.int64).to(torch.int32), out, N=1)
    assert (out.to(torch.int64) & MASK32)[0].tolist() == list(expected)


@pytest.mark.triton
def test_triton_philox_matches_on_random_counters():
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 1 << 32, (2048, 4), generator=gen, dtype=torch.int64)
    seed = 0x0123_4567_89AB_CDEF
    out = torch.zeros(2048, 4, dtype=torch.int32)
    _philox_kernel[(1,)](seed, counters.to(torch.int32), out, N=2048)
    assert torch.equal(out.to(torch.int64) & MASK32, philox4x32(counters, seed))


@pytest.mark.triton
@pytest.mark.parametrize("seed,base", STREAM_CASES)
def test_triton_randint4x_and_randn_match(seed, base):
    pytest.importorskip("triton")
    n = 4096
    ints, normals = triton_streams(seed, base, n)
    index = torch.arange(base, base + n, dtype=torch.int64)
    assert torch.equal(ints, philox4x32(counters_of(index), seed))
    # The integers are bit-equal; the float part differs only in log/cos. The interpreter
    # runs numpy's float32 log and cos (published max errors about 3.8 and 1.5 ulp), torch
    # runs SLEEF's (1 ulp). Measured: at most 3 eps relative over 6e6 samples, so 8 eps
    # relative, and no absolute slack, still catches any change to the formula.
    torch.testing.assert_close(noise(seed, n, "gaussian", offset=base), normals, rtol=8 * EPS32, atol=0)


@pytest.mark.triton
@pytest.mark.parametrize("seed,base", STREAM_CASES)
def test_gaussian4x_is_triton_randn4x(seed, base):
    """Element 4c + j is output j of tl.randn4x(seed, c): counters base .. base + 1023, their low word
    wrapping in one case; the same float tolerance as gaussian against tl.randn."""
    pytest.importorskip("triton")
    n = 1024
    out = torch.zeros(4 * n, dtype=torch.float32)
    _randn4x_kernel[(1,)](seed, base, out, N=n)
    torch.testing.assert_close(noise(seed, 4 * n, "gaussian4x", offset=4 * base), out, rtol=8 * EPS32, atol=0)


@pytest.mark.triton
@pytest.mark.parametrize("seed,offset,n", [(2**40 + 7, 77, 3000), (2**33 + 1, 2**39 - 200, 1000), (5, 0, 256)])
def test_rademacher_is_bits_of_triton_randint4x(seed, offset, n):
    pytest.importorskip("triton")
    first = offset >> 7
    groups = ((offset + n - 1) >> 7) - first + 1
    # randint4x at offset c is Philox of counter (c_lo, c_hi, 0, 0): the counters rademacher uses
    words, _ = triton_streams(seed, first, groups)
    i = torch.arange(offset, offset + n, dtype=torch.int64)
    word = words[(i >> 7) - first, (i >> 5) & 3]
    expected = (((word >> (i & 31)) & 1) * 2 - 1).to(torch.float32)
    assert torch.equal(noise(seed, n, "rademacher", offset=offset), expected)


# ---------------------------------------------------------------------------------------
# chunking and offsets


@pytest.mark.parametrize("kind", nz.KINDS)
def test_slices_equal_the_whole(kind):
    seed, total = 2**45 + 3, 5000
    whole = noise(seed, total, kind)
    for offset, n in [(77, 1000), (0, 1), (127, 2), (128, 128), (1000, 3999), (4999, 1), (100, 0), (1, 4999)]:
        assert torch.equal(noise(seed, n, kind, offset=offset), whole[offset : offset + n]), (offset, n)
    # pieces that split 128-element groups, concatenated
    cuts = [0, 77, 200, 255, 256, 333, 1077, 4097, 5000]
    pieces = [noise(seed, b - a, kind, offset=a) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(pieces), whole)


@pytest.mark.parametrize("kind", nz.KINDS)
def test_internal_chunk_size_does_not_matter(kind, monkeypatch):
    seed = 99
    expected = noise(seed, 3001, kind, offset=77)
    monkeypatch.setitem(nz._CHUNK, kind, 384)
    assert torch.equal(noise(seed, 3001, kind, offset=77), expected)


@pytest.mark.parametrize("kind", nz.KINDS)
def test_offsets_past_32_bits(kind):
    seed, start = 12345, 2**39 - 300  # rademacher counters cross 2**32, gaussian's counter hi word is > 0
    whole = noise(seed, 600, kind, offset=start)
    pieces = [noise(seed, 301, kind, offset=start), noise(seed, 299, kind, offset=start + 301)]
    assert torch.equal(torch.cat(pieces), whole)
    assert not torch.equal(whole, noise(seed, 600, kind, offset=start & MASK32))  # the high bits count


def test_gaussian_uses_words_0_and_1_of_its_counter():
    """Box-Muller cosine of Triton's uint_to_uniform_float, written out in float64 here."""
    seed, offset, n = 2**50 + 1, 2**32 + 5, 1000
    x = philox4x32(counters_of(torch.arange(offset, offset + n)), seed)
    as_int32 = torch.where(x >= 2**31, x - 2**32, x)
    u = torch.where(as_int32 < 0, ~as_int32, as_int32).to(torch.float64) * 4.6566127342e-10
    z = torch.sqrt(-2 * torch.log(u[:, 0].clamp_min(1e-7))) * torch.cos(2 * torch.pi * u[:, 1])
    torch.testing.assert_close(noise(seed, n, "gaussian", offset=offset).double(), z, rtol=1e-5, atol=1e-5)


def test_gaussian4x_takes_cosine_and_sine_of_words_0_1_then_2_3():
    """Element 4c + j of counter c's words (x0, x1, x2, x3): r(x0)·cos θ(x1), r(x0)·sin θ(x1), r(x2)·cos θ(x3),
    r(x2)·sin θ(x3), written out in float64 here."""
    seed, offset, n = 2**50 + 1, 2**34 + 6, 1001  # starts and ends inside a counter
    first = offset >> 2
    x = philox4x32(counters_of(torch.arange(first, ((offset + n - 1) >> 2) + 1)), seed)
    as_int32 = torch.where(x >= 2**31, x - 2**32, x)
    u = torch.where(as_int32 < 0, ~as_int32, as_int32).to(torch.float64) * 4.6566127342e-10
    r01, r23 = (torch.sqrt(-2 * torch.log(u[:, w].clamp_min(1e-7))) for w in (0, 2))
    t01, t23 = 2 * torch.pi * u[:, 1], 2 * torch.pi * u[:, 3]
    z = torch.stack([r01 * t01.cos(), r01 * t01.sin(), r23 * t23.cos(), r23 * t23.sin()], dim=-1).flatten()
    expected = z[offset - 4 * first : offset - 4 * first + n]
    torch.testing.assert_close(noise(seed, n, "gaussian4x", offset=offset).double(), expected, rtol=1e-5, atol=1e-5)


def test_gaussian_clamps_tiny_uniforms():
    x = philox4x32(counters_of(torch.tensor([CLAMPED_INDEX])), CLAMPED_SEED)[0]
    assert x[0].item() == 0xFFFFFFBD
    u2 = (0xFFFFFFFF - x[1].item() if x[1].item() >= 2**31 else x[1].item()) * 4.6566127342e-10
    radius = (-2 * torch.log(torch.tensor(1e-7, dtype=torch.float64))).sqrt()  # not from 3.1e-8
    expected = radius * torch.cos(2 * torch.pi * torch.tensor(u2, dtype=torch.float64))
    z = noise(CLAMPED_SEED, 3, "gaussian", offset=CLAMPED_INDEX - 1)[1]
    torch.testing.assert_close(z.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# seeds

NAME = "model.layers.0.mlp.up_proj.weight"


def test_seeds_are_the_same_in_another_process():
    code = (
        "from zotune.noise import step_seed, seed_for; "
        f"s = step_seed(1234, 7); print(s, seed_for(s, 3, {NAME!r}))"
    )
    here = step_seed(1234, 7)
    expected = f"{here} {seed_for(here, 3, NAME)}"
    # another process whose str hashes differ from this one's (random here unless PYTHONHASHSEED fixes it)
    hashseed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == expected.split()


def test_seed_values_are_pinned():
    # Recorded runs are replayed from these seeds: changing the derivation breaks them.
    assert step_seed(0, 0) == 1167185642673074249
    assert seed_for(step_seed(0, 0), 0, "weight") == 1876881095472447739


def test_seeds_differ_and_fit_in_63_bits():
    names = [NAME, "model.layers.1.mlp.up_proj.weight", "lm_head.weight", "", "é"]
    steps = [step_seed(run, step) for run in (0, 1, 2**70) for step in range(20)]
    per_param = [seed_for(s, k, name) for s in steps[:5] for k in range(8) for name in names]
    seeds = steps + per_param
    assert len(set(seeds)) == len(seeds)
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)
    # fields that a naive concatenation would run together
    s = steps[0]
    assert seed_for(s, 1, "2x") != seed_for(s, 12, "x")
    assert seed_for(s, 1, ":x") != seed_for(s, 1, "x")
    assert step_seed(1, 23) != step_seed(12, 3)


def test_seed_arguments_are_checked():
    with pytest.raises(TypeError):
        step_seed(1.5, 0)
    with pytest.raises(TypeError):
        seed_for(1, 0, 3)


# ---------------------------------------------------------------------------------------
# statistics and API


@pytest.mark.parametrize("kind", ["gaussian", "gaussian4x"])
def test_gaussian_statistics(kind):
    z = noise(2024, 100_000, kind)
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert abs(z.mean().item()) < 0.02  # standard error 0.003
    assert abs(z.std().item() - 1) < 0.02
    assert 0.035 < (z.abs() > 2).float().mean().item() < 0.056  # 4.55% for N(0, 1)
    # neighbours uncorrelated, within a counter (gaussian4x's cosine and sine of one angle) and across
    pairs = z.view(-1, 4)
    for a, b in [(0, 1), (2, 3), (0, 2), (1, 3)]:
        assert abs(torch.corrcoef(torch.stack([pairs[:, a], pairs[:, b]]))[0, 1].item()) < 0.03  # s.e. 0.006
    # ... and squares too: the cosine and sine share a radius, uncorrelated only as independent normals are
    assert abs(torch.corrcoef(torch.stack([pairs[:, 0] ** 2, pairs[:, 1] ** 2]))[0, 1].item()) < 0.03


def test_rademacher_statistics():
    z = noise(2024, 128 * 1000, "rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 0.02
    # every bit position of the 128-bit block is used and balanced (standard error 0.032)
    assert z.view(1000, 128).mean(0).abs().max().item() < 0.2
    assert not torch.equal(z[:128], z[128:256])


def test_different_seeds_give_different_noise():
    for kind in nz.KINDS:
        assert not torch.equal(noise(1, 512, kind), noise(2, 512, kind))
        assert not torch.equal(noise(1, 512, kind), noise(1 + 2**32, 512, kind))


def test_noise_like():
    param = torch.zeros(3, 5, 7, dtype=torch.float16)
    z = noise_like(param, 42, "rademacher")
    assert z.shape == param.shape and z.dtype == torch.float32 and z.device == param.device
    assert torch.equal(z.flatten(), noise(42, 105, "rademacher"))
    g = noise_like(torch.empty(0, 4), 42)
    assert g.shape == (0, 4) and g.dtype == torch.float32


def test_bad_arguments():
    with pytest.raises(ValueError):
        noise(0, 10, "uniform")
    with pytest.raises(ValueError):
        noise_like(torch.zeros(3), 0, "normal")
    with pytest.raises(ValueError):
        noise(0, -1)
    with pytest.raises(ValueError):
        noise(0, 10, offset=-1)
    with pytest.raises(ValueError):
        noise(-1, 10)
