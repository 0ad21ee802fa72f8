"""zotune.models on tiny random models: sources, heads, tokenizer, peft and parameter selection."""

import math
import os

import pytest
import torch
from conftest import CORE_ARCHS, TINY_CONFIGS, tiny_config

from zotune import models
from zotune.errors import UserError
from zotune.models import byte_tokenizer, load_model, stable_name, trainable_parameters
from zotune.schema import ModelSection

BERT = dict(model_type="bert", vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)
LORA = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"]}


def tiny(model_type="llama", **kw):
    return load_model(ModelSection(config=tiny_config(model_type), **kw.pop("section", {})), **kw)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_tiny_type_loads_and_gives_a_finite_loss(model_type):
    model, tok = tiny(model_type)
    assert model.config.model_type == model_type
    assert model.config.vocab_size >= len(tok)
    batch = tok(["Hello, world!", "héllo"], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape[:2] == batch.input_ids.shape
    assert math.isfinite(out.loss.item())
    # random init gives a loss near log(vocab); a broken model or tokenizer would not
    assert abs(out.loss.item() - math.log(model.config.vocab_size)) < 1.5


@pytest.mark.parametrize("model_type", CORE_ARCHS)
def test_the_lm_head_gets_its_last_positions_contiguous_with_the_same_logits(model_type):
    """`logits_to_keep` slices the hidden states; the head must get them contiguous (a strided slice runs one
    matrix-vector product per row on CPU: models.contiguous_head_input) and give the logits it gives unsliced."""
    model, tok = tiny(model_type)
    model.eval()  # no dropout: the two forwards compare
    head = model.get_output_embeddings()
    contiguous = []
    head.register_forward_hook(lambda module, args, out: contiguous.append(args[0].is_contiguous()))
    batch = tok(["Hello, world!", "héllo", "a third row"], return_tensors="pt", padding=True)
    with torch.no_grad():
        last = model(**batch, logits_to_keep=1).logits[:, -1]
        every = model(**batch).logits[:, -1]
    assert contiguous == [True, True]
    torch.testing.assert_close(last, every)
    models.contiguous_head_input(model)  # ZOTrainer installs it for models loaded elsewhere: once per head
    assert len(head._forward_pre_hooks) == 1


def test_same_seed_same_weights_different_seed_different():
    a, _ = tiny("qwen2", seed=3)
    b, _ = tiny("qwen2", seed=3)
    c, _ = tiny("qwen2", seed=4)
    sa, sb, sc = state(a), state(b), state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize(
    "text",
    [
        "", "plain ascii", "  leading and trailing  ", "a . b , c ' d", "tabs\tnew\nlines\r\n", "\x00\x7f nul and del",
        "héllo wörld", "日本語のテキスト", "emoji 🙂👩‍👩‍👧 flags 🇫🇷",
        "combining é (e + \u0301)", "Ω≈ç√∫ µ≤≥÷", "\u200b zero width",
    ],
)
def test_byte_tokenizer_round_trips(text):
    tok = byte_tokenizer()
    ids = tok(text).input_ids
    assert ids == list(text.encode("utf-8"))  # ids 0-255 are exactly the UTF-8 bytes
    assert tok.decode(ids) == text


def test_byte_tokenizer_special_ids():
    tok = byte_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (256, 257, 258, 259)
    assert len(tok) == 260
    assert tok.decode([104, 257, 105], skip_special_tokens=True) == "hi"


def test_bert_gets_a_classification_head_and_needs_num_labels():
    model, _ = load_model(ModelSection(config=BERT), num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3
    with pytest.raises(UserError, match="number of labels"):
        load_model(ModelSection(config=BERT))


def test_sequence_classification_architecture_selects_the_head():
    config = {**tiny_config("llama"), "architectures": ["LlamaForSequenceClassification"]}
    model, tok = load_model(ModelSection(config=config), num_labels=2)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    batch = tok(["a", "bcd"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 2)  # needs pad_token_id to find the last token


def test_bfloat16():
    model, _ = tiny("llama", section={"dtype": "bfloat16"})
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_lora_trains_only_adapter_weights_and_names_are_stable():
    model, _ = tiny("llama", section={"peft": LORA})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(n.startswith("base_model.model.") for n in trainable)
    chosen = trainable_parameters(model, [], [])
    assert [n for n, _ in chosen] == [stable_name(n) for n in trainable]
    assert chosen[0][0] == "model.layers.0.self_attn.q_proj.lora_A.default.weight"


def test_lora_init_follows_the_seed():
    a, _ = tiny("llama", section={"peft": LORA}, seed=1)
    b, _ = tiny("llama", section={"peft": LORA}, seed=1)
    c, _ = tiny("llama", section={"peft": LORA}, seed=2)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert torch.equal(state(a)[name], state(b)[name])
    assert not torch.equal(state(a)[name], state(c)[name])


def test_lora_on_a_classifier_defaults_to_seq_cls():
    model, _ = load_model(ModelSection(config=BERT, peft={"peft_type": "lora", "r": 2, "target_modules": ["query"]}),
                          num_labels=2)
    assert model.peft_config["default"].task_type == "SEQ_CLS"
    trainable = [stable_name(n) for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable)  # peft keeps the new head trainable


@pytest.mark.parametrize(
    "name, expected",
    [
        ("base_model.model.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
        ("module.transformer.wte.weight", "transformer.wte.weight"),
        ("_orig_mod.module.base_model.model.lm_head.weight", "lm_head.weight"),
        ("model.module.x", "model.module.x"),  # only at the start
        ("lm_head.weight", "lm_head.weight"),
    ],
)
def test_stable_name(name, expected):
    assert stable_name(name) == expected


def test_include_exclude_select_and_freeze_the_rest():
    model, _ = tiny("llama")
    chosen = trainable_parameters(model, include=[r"norm"], exclude=[r"^model\.norm"])
    names = [n for n, _ in chosen]
    assert names == [n for n, _ in model.named_parameters() if "norm" in n and not n.startswith("model.norm")]
    assert len(names) == 4  # 2 layers x (input, post-attention) norms
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)


def test_empty_include_keeps_everything():
    model, _ = tiny("llama")
    chosen = trainable_parameters(model, [], [])
    assert [n for n, _ in chosen] == [n for n, _ in model.named_parameters()]


def test_already_frozen_parameters_stay_out():
    model, _ = tiny("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    names = [n for n, _ in trainable_parameters(model, [r"embed|q_proj"], [])]
    assert "model.embed_tokens.weight" not in names
    assert len(names) == 2


def test_tied_weights_appear_once():
    model, _ = tiny("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    chosen = trainable_parameters(model, [], [])
    params = [p for _, p in chosen]
    assert len(params) == len({id(p) for p in params})
    assert sum(p is model.lm_head.weight for p in params) == 1
    # either name of the tied weight selects it
    assert [n for n, _ in trainable_parameters(tiny("gpt2")[0], [r"^lm_head"], [])] == ["transformer.wte.weight"]


def test_bad_regex_and_empty_selection_are_user_errors():
    model, _ = tiny("llama")
    with pytest.raises(UserError, match=r"params\.include"):
        trainable_parameters(model, ["(unclosed"], [])
    with pytest.raises(UserError, match=r"params\.exclude"):
        trainable_parameters(model, [], ["[bad"])
    with pytest.raises(UserError, match="no trainable parameter"):
        trainable_parameters(model, ["no_such_param"], [])
    assert all(p.requires_grad for p in model.parameters())  # a failed selection freezes nothing


@pytest.mark.parametrize(
    "section, key",
    [
        (dict(name_or_path="./no/such/model"), r"model\.name_or_path"),
        (dict(name_or_path="/no/such/model"), r"model\.name_or_path"),
        (dict(config={"model_type": "no_such_arch"}), r"model\.config\.model_type"),
        (dict(config={"hidden_size": 8}), r"model\.config\.model_type"),
        (dict(config={**tiny_config("llama"), "vocab_size": 100}), r"model\.config\.vocab_size"),
        (dict(config=tiny_config("llama"), peft={"peft_type": "NO_SUCH", "r": 4}), r"model\.peft\.peft_type"),
        (dict(config=tiny_config("llama"), peft={"r": 4}), r"model\.peft\.peft_type"),
        (dict(config=tiny_config("llama"), peft={**LORA, "rank": 4}), r"model\.peft\.rank"),
        (dict(config=tiny_config("llama"), peft={**LORA, "target_modules": ["nope"]}), r"model\.peft"),
        (dict(gguf_file="/no/such/file.gguf"), r"model\.gguf_file"),
        (dict(gguf_package="no_such_gguf_package"), r"model\.gguf_package"),
    ],
)
def test_user_errors_name_the_key(section, key):
    with pytest.raises(UserError, match=key):
        load_model(ModelSection(**section))


def test_directory_without_model_or_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"model\.name_or_path: cannot load a model config"):
        load_model(ModelSection(name_or_path=str(tmp_path)))
    tiny("llama")[0].save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"model\.name_or_path: cannot load a tokenizer"):
        load_model(ModelSection(name_or_path=str(tmp_path)))


def test_save_and_load_back_through_name_or_path(tmp_path):
    model, tok = tiny("gpt2", seed=5)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(ModelSection(name_or_path=str(tmp_path)))
    assert type(loaded) is type(model)
    a, b = state(model), state(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    text = "héllo 🙂"
    assert loaded_tok(text).input_ids == tok(text).input_ids
    assert loaded_tok.decode(loaded_tok(text).input_ids) == text
    assert loaded_tok.pad_token_id == 258
    # and in another dtype
    half, _ = load_model(ModelSection(name_or_path=str(tmp_path), dtype="bfloat16"))
    assert half.transformer.wte.weight.dtype == torch.bfloat16


# --- the GGUF cache, with a fake package and a stub converter (the real one is in the integration tests) ---

FAKE_PACKAGE = '''
from pathlib import Path
__version__ = "1.2"
MODEL_NAME = "fake.gguf"
def assemble(path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")
    return path
'''


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A `gguf_package` named fake_gguf_pkg; conversion saves a tiny gpt2 and is counted."""
    (tmp_path / "pkgs" / "fake_gguf_pkg").mkdir(parents=True)
    (tmp_path / "pkgs" / "fake_gguf_pkg" / "__init__.py").write_text(FAKE_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(gguf, out):
        calls.append(gguf)
        assert gguf.read_bytes() == b"GGUF"
        if getattr(convert, "fail", False):
            (out / "partial").mkdir(parents=True)
            raise KeyboardInterrupt
        model, tok = tiny("gpt2", seed=7)
        model.save_pretrained(out)
        tok.save_pretrained(out)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return convert, calls, tmp_path / "cache"


def test_gguf_package_converts_once_then_uses_the_cache(fake_gguf):
    _, calls, cache = fake_gguf
    section = ModelSection(gguf_package="fake_gguf_pkg")
    first, _ = load_model(section)
    second, tok = load_model(section)
    assert len(calls) == 1
    entry = models.gguf_cache_dir(section)
    assert entry == cache / "gguf" / "fake_gguf_pkg-1.2"
    assert (entry / "model.safetensors").is_file() and (entry / "tokenizer.json").is_file()
    assert not (entry / "fake.gguf").exists()  # the assembled GGUF is not kept
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temp folders left
    assert all(torch.equal(a, b) for a, b in zip(state(first).values(), state(second).values()))
    assert tok.pad_token_id == 258


def test_interrupted_conversion_leaves_no_cache_entry(fake_gguf):
    convert, calls, cache = fake_gguf
    section = ModelSection(gguf_package="fake_gguf_pkg")
    convert.fail = True
    with pytest.raises(KeyboardInterrupt):
        load_model(section)
    assert list((cache / "gguf").iterdir()) == []
    convert.fail = False
    load_model(section)  # converts again, this time to the end
    assert len(calls) == 2 and models.gguf_cache_dir(section).is_dir()


def test_gguf_file_cache_key_follows_path_size_and_mtime(fake_gguf, tmp_path):
    _, calls, cache = fake_gguf
    (tmp_path / "models").mkdir()
    gguf = tmp_path / "models" / "m.gguf"
    gguf.write_bytes(b"GGUF")
    by_dir = ModelSection(name_or_path=str(tmp_path / "models"), gguf_file="m.gguf")
    by_path = ModelSection(gguf_file=str(gguf))
    assert models.gguf_cache_dir(by_dir) == models.gguf_cache_dir(by_path)
    load_model(by_dir)
    load_model(by_path)
    assert len(calls) == 1
    old = models.gguf_cache_dir(by_path)
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))
    assert models.gguf_cache_dir(by_path) != old
    load_model(by_path)
    assert len(calls) == 2
