"""Load the model and tokenizer a recipe's `model` section names, and pick the parameters that train.

Three sources:
- `name_or_path`: a hub name or a local directory, loaded with `from_pretrained`;
- `gguf_file` / `gguf_package`: a GGUF checkpoint, converted once to a safetensors folder in
  the cache (`$ZOTUNE_CACHE`, default ~/.cache/zotune) and loaded from there afterwards;
- `config`: a model with random weights, seeded, with a byte-level tokenizer (for tests).

Any of them can be loaded quantized by bitsandbytes (`model.quantization`); the quantized
weights never train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.metadata
import inspect
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from zotune.errors import UserError
from zotune.paths import cache_root
from zotune.schema import ModelSection, QuantizationSection

log = logging.getLogger("zotune")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WRAPPER_PREFIXES = ("base_model.model.", "module.", "_orig_mod.")  # peft, DDP, torch.compile
BYTE_SPECIALS = ("<bos>", "<eos>", "<pad>", "<unk>")  # ids 256..259 of the byte tokenizer


def load_model(
    section: ModelSection, *, num_labels: int | None = None, seed: int = 0, unfreeze: list[str] = (),
    needs_tokenizer: bool = True, tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The model (with its peft adapter, if any) and tokenizer that `section` describes.

    `unfreeze` (a recipe's `params.unfreeze`) names base parameters that train beside the adapter.
    Without `needs_tokenizer` (replay: the weights are all it needs), a model folder without a
    tokenizer gives None for it instead of an error. `tokenizer`: one loaded from the same model folder
    already (`zotune.preflight.Checked`), taken instead of loading it again; a model built from
    `config` makes its byte tokenizer itself.
    """
    dtype = DTYPES[section.dtype]
    quantization = _bnb_config(section.quantization, dtype) if section.quantization is not None else None
    if section.config is not None:
        model, tokenizer = _from_config(section.config, dtype, num_labels, seed, quantization)
    else:
        if section.gguf_file is not None or section.gguf_package is not None:
            path, trust = str(_converted_gguf(section)), False
        else:
            path, trust = _check_name_or_path(section.name_or_path), section.trust_remote_code
        model, tokenizer = _from_pretrained(path, dtype, num_labels, trust, quantization, needs_tokenizer, tokenizer)
    if quantization is not None:
        _use_reference_4bit_matmul(model)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # classifiers find the last token by it
    if unfreeze and section.peft is None:
        raise UserError("params.unfreeze: only with model.peft; without an adapter every unquantized parameter trains")
    if section.peft is not None:
        model = _add_adapter(model, section.peft, seed, unfrozen_modules(model, unfreeze))
    contiguous_head_input(model)
    return model, tokenizer


def unwrapped(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_accepts(model, name: str) -> bool:
    """Whether the model's forward takes argument `name` (asked of the unwrapped model: peft's take **kwargs)."""
    return name in inspect.signature(unwrapped(model).forward).parameters


def contiguous_head_input(model) -> None:
    """Hand the LM head (the output embeddings) a contiguous input; installed once per head.

    A causal LM that scores only its last positions (`logits_to_keep`, which `generate` and the
    classification collator pass) gives its head the slice `hidden[:, -k:]`. On CPU `torch.matmul`
    does not fold such a 3-D slice into one matrix product: it runs one matrix-vector product per row,
    each reading the whole head (pytorch/pytorch#186148). Gemma 3's head has 262k rows: 64 rows took
    2.5 s against 0.4 s contiguous on an AVX2 EPYC; copying the slice costs next to nothing.
    """
    base = unwrapped(model)  # ZOTrainer takes any nn.Module: only transformers models name their head
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and _contiguous_input not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(module, args: tuple):
    return (args[0].contiguous(), *args[1:]) if args and torch.is_tensor(args[0]) else None


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose ids 0-255 are the bytes of the UTF-8 text, then <bos> <eos> <pad> <unk>.

    Every text encodes and decodes back unchanged. Built as a BPE with no merges and byte
    fallback, so each character becomes the ids of its UTF-8 bytes.
    """
    from tokenizers import Tokenizer, decoders, models

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab.update({tok: 256 + i for i, tok in enumerate(BYTE_SPECIALS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(list(BYTE_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def stable_name(name: str) -> str:
    """`name` without the prefixes that peft, DDP and torch.compile put in front of it."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def is_quantized(param: torch.Tensor) -> bool:
    """Whether `param` holds quantized codes (bitsandbytes' Params4bit / Int8Params, or any non-float tensor)."""
    return not param.dtype.is_floating_point or type(param).__module__.startswith("bitsandbytes")


def unfrozen_modules(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """The modules owning a parameter whose name matches one of `patterns`: peft's `modules_to_save`.

    peft then trains a copy of each (saved with the adapter, merged by `zotune export --merge`).
    A quantized weight is refused: ZO would perturb its quantized codes, not the weight they encode.
    """
    compiled = _compile(patterns, "params.unfreeze")
    modules, used = [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(prefix=module_name, recurse=False):
            hits = [p.pattern for p in compiled if p.search(name)]
            if not hits:
                continue
            quantized = next((q for q in module.parameters(recurse=False) if is_quantized(q)), None)
            if quantized is not None:
                what = "a quantized weight" if quantized is param else f"in a quantized layer ({type(module).__name__})"
                raise UserError(
                    f"params.unfreeze: {hits[0]!r} matches {name}, {what}; ZO would perturb quantized codes, not the "
                    "weights they encode. Narrow the pattern to unquantized modules (norms, embeddings) and train "
                    "quantized layers through the adapter (LoRA on them; LoRA's `bias` option trains their biases), "
                    "or load the base without model.quantization"
                )
            used.update(hits)
            if module_name not in modules:
                modules.append(module_name)
    unused = [p for p in patterns if p not in used]
    if unused:
        raise UserError(f"params.unfreeze: {unused[0]!r} matches no parameter of the model")
    return modules


def trainable_parameters(
    model: torch.nn.Module, include: list[str], exclude: list[str]
) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters that train, as (stable name, parameter) in model order; freezes all others.

    Starts from those with requires_grad (peft has already frozen its base model). A parameter
    is kept when one of its names matches an `include` pattern (or `include` is empty) and none
    matches an `exclude` pattern. A tied parameter appears once, under its first name, but any
    of its names may match. A quantized parameter that would train is an error.
    """
    includes = _compile(include, "params.include")
    excludes = _compile(exclude, "params.exclude")
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(stable_name(name))

    chosen, dropped = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        aliases = names[id(param)]
        keep = not includes or any(p.search(a) for p in includes for a in aliases)
        keep = keep and not any(p.search(a) for p in excludes for a in aliases)
        (chosen if keep else dropped).append((stable_name(name), param))
    if not chosen:
        raise UserError(f"params: no trainable parameter matches include={include} and exclude={exclude}")
    quantized = [name for name, param in chosen if is_quantized(param)]
    if quantized:
        raise UserError(
            f"params.include: {quantized[0]} is a quantized weight and would train, perturbing its quantized codes; "
            "exclude it (params.exclude) and train the layer through an adapter"
        )
    for _, param in dropped:
        param.requires_grad_(False)
    return chosen


def gguf_cache_dir(section: ModelSection) -> Path:
    """Where the safetensors conversion of the section's GGUF lives (whether or not it exists yet)."""
    if section.gguf_package is not None:
        module = _import_gguf_package(section.gguf_package)
        key = f"{section.gguf_package}-{_package_version(module)}"
    else:
        path = _gguf_path(section)
        stat = path.stat()
        digest = hashlib.blake2b(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode(), digest_size=8)
        key = f"{path.stem}-{digest.hexdigest()}"
    return cache_root() / "gguf" / key


# --- sources ---------------------------------------------------------------------------


def _from_config(fields: dict[str, Any], dtype, num_labels, seed, quantization=None):
    fields = dict(fields)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise UserError("model.config.model_type: missing; give the architecture, e.g. llama")
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"model.config.model_type: unknown model type {model_type!r}")
    tokenizer = byte_tokenizer()
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    try:
        config = AutoConfig.for_model(model_type, **{**special, **fields})
    except Exception as e:  # transformers' strict config validation raises several kinds
        raise UserError(f"model.config: {e}") from e
    if getattr(config, "vocab_size", None) is not None and config.vocab_size < len(tokenizer):
        raise UserError(
            f"model.config.vocab_size: {config.vocab_size} is smaller than the byte tokenizer's {len(tokenizer)} tokens"
        )
    auto = _head(config, num_labels)
    torch.manual_seed(seed)
    model = auto.from_config(config, dtype=dtype)
    if quantization is not None:
        # bitsandbytes quantizes while loading a checkpoint: save the random weights, load them back
        with tempfile.TemporaryDirectory(prefix="zotune-") as tmp:
            model.save_pretrained(tmp)
            model = auto.from_pretrained(tmp, dtype=dtype, quantization_config=quantization)
    return model, tokenizer


def _from_pretrained(path: str, dtype, num_labels, trust_remote_code: bool, quantization=None,
                     needs_tokenizer: bool = True, tokenizer: PreTrainedTokenizerBase | None = None):
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name_or_path: cannot load a model config from {path!r}: {e}") from e
    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if needs_tokenizer:
            raise UserError(f"model.name_or_path: cannot load a tokenizer from {path!r}: {e}") from e
        tokenizer = None
    auto = _head(config, num_labels)
    model = auto.from_pretrained(
        path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, quantization_config=quantization
    )
    return model, tokenizer


def _use_reference_4bit_matmul(model: PreTrainedModel) -> None:
    """Keep bitsandbytes' 4-bit layers off their CPU fast path.

    On CPUs with AVX512-BF16 that path (taken in eval mode, where ZO runs) repacks the weights
    at the first forward, rounding their block scales to bfloat16, and multiplies in bfloat16.
    ZO's loss differences, of order eps, would drown in that rounding, and the quantized state
    would change under training. The reference path dequantizes to the compute dtype: the model
    then computes exactly what its dequantized copy computes, which `zotune export --merge` writes.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _bnb_config(section: QuantizationSection, dtype):
    """The transformers `BitsAndBytesConfig` of a recipe's `model.quantization`."""
    try:
        importlib.import_module("bitsandbytes")
    except ImportError as e:
        raise UserError(
            f"model.quantization: needs the bitsandbytes package ({e}); pip install 'zotune[quant]'"
        ) from e
    from transformers import BitsAndBytesConfig

    if section.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=section.quant_type or "nf4",
        bnb_4bit_compute_dtype=DTYPES[section.compute_dtype] if section.compute_dtype else dtype,
        bnb_4bit_use_double_quant=section.double_quant,
    )


def _head(config: PreTrainedConfig, num_labels: int | None):
    """AutoModelForCausalLM, or AutoModelForSequenceClassification for encoders and classifiers."""
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    # bert & co. are in the causal-LM mapping too (usable as decoders), but they are masked LMs
    # first; `is_decoder` does not tell them apart (gpt_neox's config says False as well)
    model_type = config.model_type
    causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if causal and not classifier:
        return AutoModelForCausalLM
    if num_labels is None and not classifier:
        raise UserError(
            f"model: {model_type} is not a causal LM, so it gets a classification head, "
            "which needs the number of labels (a classification task)"
        )
    if num_labels is not None:
        config.num_labels = num_labels
    return AutoModelForSequenceClassification


def _check_name_or_path(name: str) -> str:
    if name.startswith((".", "/", "~")):
        path = Path(name).expanduser()
        if not path.exists():
            raise UserError(f"model.name_or_path: directory not found: {path}")
        return str(path)
    return name


# --- GGUF ------------------------------------------------------------------------------


def _gguf_path(section: ModelSection) -> Path:
    path = Path(section.gguf_file).expanduser()
    if section.name_or_path is not None:
        path = Path(section.name_or_path).expanduser() / path
    if not path.is_file():
        raise UserError(f"model.gguf_file: file not found: {path}")
    return path.resolve()


def _import_gguf_package(name: str):
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"model.gguf_package: cannot import {name!r}: {e}") from e
    if not callable(getattr(module, "assemble", None)):
        raise UserError(f"model.gguf_package: {name!r} has no assemble(path) function")
    return module


def _package_version(module) -> str:
    version = getattr(module, "__version__", None)
    if version is None:
        top = module.__name__.split(".")[0]
        dists = importlib.metadata.packages_distributions().get(top, [top])
        version = importlib.metadata.version(dists[0])
    return version


def _converted_gguf(section: ModelSection) -> Path:
    """The cached safetensors folder for the GGUF, converting it first if there is none."""
    target = gguf_cache_dir(section)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    source = section.gguf_package or section.gguf_file
    log.info("Converting GGUF %s to safetensors in %s; this happens once, later loads use the cache", source, target)
    start = time.perf_counter()
    # build in a temp folder beside the target and rename it into place, so an interrupted
    # conversion never leaves a half-written entry behind
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if section.gguf_package is not None:
            module = _import_gguf_package(section.gguf_package)
            name = getattr(module, "MODEL_NAME", f"{section.gguf_package}.gguf")
            gguf = Path(module.assemble(tmp / "gguf" / name))
        else:
            gguf = _gguf_path(section)
        _convert_gguf(gguf, tmp / "model")
        try:
            os.rename(tmp / "model", target)
        except OSError:
            if not target.is_dir():  # else another process finished first, and its copy is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Converted GGUF %s in %.1f s", source, time.perf_counter() - start)
    return target


GGUF_STAGES = ("reading the tokenizer", "dequantizing the weights", "copying them into a plain model",
               "saving safetensors")


@contextlib.contextmanager
def stage_progress(title: str, stages: tuple[str, ...], console: Console | None = None) -> Iterator[Callable[[], None]]:
    """A progress bar over `stages` with the elapsed time, on stderr (drawn on a terminal only);
    yields `next_stage()`, to call as each stage after the first begins."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"{title}: {stages[0]}", total=len(stages))
        done = iter(stages[1:])

        def next_stage() -> None:
            progress.update(task, advance=1, description=f"{title}: {next(done)}", refresh=True)

        yield next_stage
        progress.update(task, advance=1)


def _convert_gguf(gguf: Path, out: Path) -> None:
    # minutes for a few hundred million parameters, the dequantizing most (transformers draws its
    # own bar over the tensors under this one)
    with stage_progress(f"converting {gguf.name}", GGUF_STAGES) as next_stage:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        next_stage()
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        next_stage()
        # save_pretrained refuses a model loaded from GGUF: copy its weights into a plain model
        config = loaded.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        del loaded
        next_stage()
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


# --- peft ------------------------------------------------------------------------------


def _add_adapter(model: PreTrainedModel, spec: dict[str, Any], seed: int, modules_to_save: list[str]):
    import peft

    spec = dict(spec)
    peft_type = str(spec.pop("peft_type", "")).upper()
    if peft_type not in peft.PEFT_TYPE_TO_CONFIG_MAPPING:
        known = ", ".join(sorted(str(t.value) for t in peft.PEFT_TYPE_TO_CONFIG_MAPPING))
        raise UserError(f"model.peft.peft_type: unknown or missing {peft_type!r}; known: {known}")
    config_cls = peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for key in spec:
        if key not in fields:
            raise UserError(f"model.peft.{key}: not a field of {config_cls.__name__}")
    is_classifier = type(model).__name__.endswith("ForSequenceClassification")
    spec.setdefault("task_type", "SEQ_CLS" if is_classifier else "CAUSAL_LM")
    if modules_to_save:
        spec["modules_to_save"] = [*(spec.get("modules_to_save") or []), *modules_to_save]
    try:
        config = peft.get_peft_config({"peft_type": peft_type, **spec})
        torch.manual_seed(seed)  # adapter init (e.g. LoRA's A) follows the recipe seed
        return peft.get_peft_model(model, config)
    except (ValueError, TypeError) as e:
        raise UserError(f"model.peft: {e}") from e


def _compile(patterns: list[str], key: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise UserError(f"{key}: {pattern!r} is not a valid regular expression: {e}") from e
    return compiled
