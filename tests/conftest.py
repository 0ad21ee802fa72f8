"""Shared fixtures: tiny random models for every architecture the tests cover.

TRITON_INTERPRET must be set before anything imports triton (torch.compile does),
so it is set here, at the top of the first module pytest imports. So is HF_DATASETS_CACHE
(read when `datasets` is first imported): the data files the tests write into fresh folders
would otherwise leave a prepared copy and a lock file each in the user's
~/.cache/huggingface/datasets, about 29 MB and 260 files a run. A pytest run gets a temporary
one, made by its first process and named in $ZOTUNE_TESTS_DATASETS_CACHE, which its xdist workers
and every subprocess the tests start inherit: they all share it (the integration tests tokenize
the same rotten_tomatoes once); the first process removes it when it ends.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATASETS_CACHE_OF_RUN = "ZOTUNE_TESTS_DATASETS_CACHE"
if DATASETS_CACHE_OF_RUN not in os.environ:
    os.environ[DATASETS_CACHE_OF_RUN] = tempfile.mkdtemp(prefix="zotune-tests-datasets-")
    atexit.register(shutil.rmtree, os.environ[DATASETS_CACHE_OF_RUN], ignore_errors=True)
os.environ["HF_DATASETS_CACHE"] = os.environ[DATASETS_CACHE_OF_RUN]

import contextlib  # noqa: E402
import gc  # noqa: E402
import signal  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from zotune.kernels import _native  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # make test runs one worker per core: one thread each, subprocesses too
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

VOCAB = 300  # the byte tokenizer's 256 bytes and a few special tokens fit below this
SPECIAL = dict(bos_token_id=256, eos_token_id=257, pad_token_id=258)  # the byte tokenizer's ids
COMMON = dict(SPECIAL, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64)

# model_type -> config fields of a tiny model with random weights
TINY_CONFIGS = {
    "gpt2": dict(SPECIAL, vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "opt": dict(SPECIAL, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                word_embed_proj_dim=32, max_position_embeddings=128),
    "llama": dict(COMMON, num_key_value_heads=2, max_position_embeddings=128),
    "qwen2": dict(COMMON, num_key_value_heads=2, max_position_embeddings=128),
    "qwen3": dict(COMMON, num_key_value_heads=2, head_dim=8, max_position_embeddings=128),
    "gemma3_text": dict(COMMON, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                        sliding_window=16),
    "mistral": dict(COMMON, num_key_value_heads=2, max_position_embeddings=128),
    "gpt_neox": dict(COMMON, max_position_embeddings=128),
    "phi3": dict(COMMON, num_key_value_heads=2, max_position_embeddings=128),
}
# zotune.kernels' test matrix, shared by tests/test_kernels.py and tests/test_kernels_out_of_place.py
KERNEL_SEEDS = (2**40 + 3, 0x5EED_0000_0001)  # both past 2**32: the key's high word matters
# the native noise where it can run (x86 with AVX2 or AVX-512; then it must build: a missing compiler fails)
NATIVE = pytest.param("native", marks=pytest.mark.skipif(
    _native.capability() is None, reason=f"no native noise for torch's CPU capability here "
                                         f"({torch.backends.cpu.get_cpu_capability()})"))
KERNEL_IMPLS = [pytest.param("triton", marks=pytest.mark.triton), NATIVE, "compiled", "eager"]
FAST_KERNEL_IMPLS = [pytest.param("triton", marks=pytest.mark.triton), NATIVE, "compiled"]  # held to the twin
# Triton compiled for a GPU, run on CUDA copies of a test's CPU tensors (`kernels_on`); an extra
# parameter of the tests that hold the kernels to their twin
TRITON_CUDA = "triton-cuda"
CUDA_KERNELS = pytest.param(TRITON_CUDA, marks=pytest.mark.cuda)
# the largest coefficient on z in the kernel tests' ops (test_kernels.OPS; the out-of-place ones are smaller)
LARGEST_Z_COEFFICIENT = 1.7
KERNEL_DTYPES = {  # name -> (param dtype, with fp32 master)
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
    "bf16+master": (torch.bfloat16, True),
}
# the five architectures every core property is checked on
CORE_ARCHS = ["gpt2", "opt", "llama", "qwen2", "gemma3_text"]


def tiny_config(model_type: str) -> dict:
    """A recipe-style `model.config` dict for a tiny model of this type."""
    return {"model_type": model_type, **TINY_CONFIGS[model_type]}


def tiny_causal_lm(model_type: str, seed: int = 0, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(TINY_CONFIGS[model_type])
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


@pytest.fixture(params=CORE_ARCHS)
def core_arch(request):
    return request.param


@contextlib.contextmanager
def no_hang(seconds: int, what: str):
    """Fail with TimeoutError when the block runs longer than `seconds` (the fuzzers' hang check)."""
    def alarm(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- CUDA --------------------------------------------------------------------------------
# Tests marked `cuda` run only where a GPU is and Triton compiles (make gpu-check); elsewhere
# `pytest_runtest_setup` skips them before any fixture runs, so they cost the CPU run nothing.

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def cuda_missing() -> str | None:
    """Why the tests marked cuda cannot run in this process, or None."""
    from zotune.kernels._dispatch import interpreting

    if not torch.cuda.is_available():
        what = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda} but sees no GPU"
        return f"needs a CUDA GPU: torch {torch.__version__} is {what} (make gpu-check runs these on one)"
    if interpreting():
        return ("TRITON_INTERPRET=1 (this conftest's default) would interpret the Triton kernels, not compile them: "
                "run TRITON_INTERPRET=0 pytest -m cuda (make gpu-check does)")
    return None


def pytest_collection_finish(session):
    """Every Trainer.train() runs a full garbage collection (accelerate's free_memory), which walks every
    object alive, after collection every test module's imports too. Those live to the end, so they are
    frozen out of the walk (gc.freeze): test_methods, test_zo_trainer and test_dual on two workers took
    144 s with the walk, 90 s without."""
    gc.collect()
    gc.freeze()


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None:
        reason = cuda_missing()
        if reason is not None:
            pytest.skip(reason)


@contextlib.contextmanager
def forced_kernels(impl: str):
    """Run zotune.kernels with implementation `impl` (ZOTUNE_KERNELS) inside the block."""
    from zotune.kernels import _dispatch

    old = os.environ.get(_dispatch.ENV)
    os.environ[_dispatch.ENV] = impl
    try:
        yield
    finally:
        if old is None:
            del os.environ[_dispatch.ENV]
        else:
            os.environ[_dispatch.ENV] = old


@contextlib.contextmanager
def kernels_on(impl: str, tensors: dict):
    """Run zotune.kernels with `impl` inside the block, on ``tensors`` (name -> tensor or None) as
    that implementation takes them: the tensors themselves, or for TRITON_CUDA CUDA copies (strides
    kept, so a transposed view stays non-contiguous there) written back into the originals on exit."""
    if impl != TRITON_CUDA:
        with forced_kernels(impl):
            yield tensors
        return
    on_gpu = {name: None if t is None else t.to("cuda") for name, t in tensors.items()}
    with forced_kernels("triton"):
        yield on_gpu
    for name, t in tensors.items():
        if t is not None:
            t.copy_(on_gpu[name])


def fast_math_error(seed: int, numel: int, offset: int, kind: str = "gaussian") -> torch.Tensor:
    """A bound on |z_gpu - z| for each element of noise(seed, numel, kind, offset) (gaussian or
    gaussian4x), z_gpu being tl.randn (tl.randn4x) compiled for a GPU, where Triton may take log, sqrt,
    cos and sin from the approximate PTX instructions (lg2.approx, sqrt.approx, cos.approx, sin.approx:
    errors within 2**-22 absolute on log2, 2**-22 relative on sqrt and 2**-20 absolute on cos and sin,
    rounded up from their documented bounds).

    With z = r·cos(θ) (or r·sin(θ)) and r = sqrt(-2·ln u), an absolute error δ in ln u moves r by δ/r:
    large where u is near 1 and r small, so the bound is per element, from r. The eager reference's own
    error, a few ulp of z, is the last term.
    """
    from zotune.noise import _MASK32, _key, _philox, _uniform, noise

    i = torch.arange(offset, offset + numel, dtype=torch.int64)
    counter = i if kind == "gaussian" else i >> 2
    zero = torch.zeros_like(i)
    x0, _, x2, _ = _philox(counter & _MASK32, counter >> 32, zero, zero, *_key(seed))
    radius_word = x0 if kind == "gaussian" else torch.where((i & 3) < 2, x0, x2)  # gaussian4x: words 0, 2
    u = torch.clamp(_uniform(radius_word).double(), min=1e-7)
    r = (-2 * u.log()).sqrt()
    z = noise(seed, numel, kind, offset).double()
    return 2**-21 / r + 2**-21 * r + 2**-20 * r + 16 * torch.finfo(torch.float32).eps * z.abs()


def kernel_slack(impl: str, kind: str, numel: int, offset: int) -> torch.Tensor | float:
    """Absolute tolerance to add to `assert_kernel_close`'s for a kernel test's outputs, element by element
    in row-major order: for Triton on a GPU with gaussian noise, the largest coefficient on z times the
    fast-math bound of both seeds' z; nothing elsewhere."""
    if impl != TRITON_CUDA or kind == "rademacher":
        return 0.0
    return LARGEST_Z_COEFFICIENT * sum(fast_math_error(seed, numel, offset, kind) for seed in KERNEL_SEEDS)


def assert_kernel_close(actual, expected, kind: str, name: str = "", slack: torch.Tensor | float = 0.0) -> None:
    """tests/test_kernels.py's tolerance table, on two tensors compared in row-major order:
    rademacher bit-equal; gaussian abs 1e-5 (+ `slack`), plus one ulp of the dtype for 16-bit outputs."""
    act, exp = actual.reshape(-1).cpu(), expected.reshape(-1).cpu()
    where = f"{name}: " if name else ""
    assert act.dtype == exp.dtype
    if kind == "rademacher":
        bad = (act != exp).nonzero()
        assert bad.numel() == 0, f"{where}{bad.numel()} of {exp.numel()} elements differ, first at {bad[0].item()}"
        return
    rtol = 0.0 if exp.dtype == torch.float32 else torch.finfo(exp.dtype).eps
    err = (act.float() - exp.float()).abs() - (1e-5 + slack + rtol * exp.float().abs())
    worst = err.argmax().item()
    assert err[worst] <= 0, f"{where}element {worst}: {act[worst].item()} vs {exp[worst].item()}"


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """helpers.TINY as tiny.yaml in a fresh cwd that holds the data files it names."""
    from helpers import TINY

    monkeypatch.chdir(tmp_path)
    for name in ("train.jsonl", "validation.jsonl"):
        (tmp_path / name).write_text('{"text": "good", "label": 1}\n')
    (tmp_path / "tiny.yaml").write_text(TINY)
    return tmp_path / "tiny.yaml"


# -- several processes: tests/test_data_parallel.py, tests/test_fsdp.py ----------------------------

FSDP_RUN = dict(batch=2, shard="fsdp", schedule="fused")


@pytest.fixture(scope="session")
def launched(tmp_path_factory, worker_id):
    """The two-rank runs that tests/test_data_parallel.py and tests/test_fsdp.py compare: one
    launch per launcher, run once per pytest run (xdist's workers share it through a lock on their
    common temporary folder): {launcher: {run: {rank: (facts, weights)}}}, and the folder of the runs."""
    from filelock import FileLock
    from helpers import launch, ranks_of

    root = tmp_path_factory.getbasetemp()
    out = (root if worker_id == "master" else root.parent) / "launched"
    fsdp = out / "torchrun" / "fsdp"
    launches = {
        "torchrun": {"dual": dict(batch=2), "fused": dict(batch=2, schedule="fused"),
                     "fsdp": dict(FSDP_RUN, save_steps=2),  # checkpoints at steps 2 and 4
                     "fsdp-resumed": dict(FSDP_RUN, resume=fsdp / "checkpoint-2"),
                     # tests/test_reward.py: the ranks share out a reward run's population
                     "reward-dual": dict(batch=2, task="reward"),
                     "reward-fused": dict(batch=2, task="reward", schedule="fused"),
                     # the raw optimizer (tests/optimizer_ranks.py): data-parallel and sharded, then FSDP2
                     "optimizer": dict(task="optimizer"), "fsdp-optimizer": dict(task="fsdp-optimizer")},
        "accelerate": {"dual": dict(batch=2), "fsdp": FSDP_RUN},
    }
    with FileLock(f"{out}.lock"):
        if not (out / "done").exists():
            for launcher, runs in launches.items():
                launch(out / launcher, 2, runs, launcher)
            (out / "done").touch()
    return out, {launcher: {name: ranks_of(out / launcher / name, 2) for name in runs}
                 for launcher, runs in launches.items()}
