"""Shared fixtures: tiny random models for every architecture the tests cover.

TRITON_INTERPRET must be set before anything imports triton (torch.compile does),
so it is set here, at the top of the first module pytest imports.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib  # noqa: E402
import signal  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

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
KERNEL_IMPLS = [pytest.param("triton", marks=pytest.mark.triton), "compiled", "eager"]
FAST_KERNEL_IMPLS = [pytest.param("triton", marks=pytest.mark.triton), "compiled"]  # the ones held to the twin
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


def assert_kernel_close(actual, expected, kind: str, name: str = "") -> None:
    """tests/test_kernels.py's tolerance table, on two tensors compared in row-major order:
    rademacher bit-equal; gaussian abs 1e-5, plus one ulp of the dtype for 16-bit outputs."""
    act, exp = actual.reshape(-1), expected.reshape(-1)
    where = f"{name}: " if name else ""
    assert act.dtype == exp.dtype
    if kind == "rademacher":
        bad = (act != exp).nonzero()
        assert bad.numel() == 0, f"{where}{bad.numel()} of {exp.numel()} elements differ, first at {bad[0].item()}"
        return
    rtol = 0.0 if exp.dtype == torch.float32 else torch.finfo(exp.dtype).eps
    err = (act.float() - exp.float()).abs() - (1e-5 + rtol * exp.float().abs())
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
