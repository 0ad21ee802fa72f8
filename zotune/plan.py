"""Plan the memory of a ZO step for any causal LM config, without allocating any weights.

The model is built on the meta device: its parameters and buffers have shapes and dtypes
but no storage, so even OPT-175B is planned in about a second. `find_blocks` splits the
parameters into the transformer blocks and the resident parts (embeddings, final norm,
head; a tied weight counts once). The accounting follows zotune's code as built:

Compute device
- **parameters**: all of them; with offloading (`zotune.offload`) the resident parts plus
  `buffers` blocks in flight (on CUDA: the previous one still being written back, the
  current one, the prefetched next), each in the weights' dtype: a transfer dtype halves
  the transfer, not the copy, which is cast back on arrival; the 16-bit copy of the largest
  tensor in flight is counted as well;
- **fp32 master copy**: `zotune.optim` keeps one beside a 16-bit trainable weight where
  `zotune.precision.keeps_master` says so for `zo.master_weights` (taking ZO-SGD's
  stochastically rounded update): under `auto`, only with the in-place `sequential` and
  `fused` schedules, never under `dual`; `fp32` beside every 16-bit weight; `none` never; fp32
  weights never. It lives on the weight's device: with offloading only the resident parts'
  master is here. Every weight is taken to train (a recipe's `params.include`/`exclude` are not
  applied: an upper bound), except with a PEFT adapter, where none of the base weights do;
- **scratch (perturbed copies)**: under `dual` each module that owns trainable parameters runs
  on perturbed copies of its own parameters, made for its call and freed after
  (`zotune.scratch`): the largest `scratch_bytes` of any one module, with an Embedding's rows
  looked up taken as min(V, 2·B·T) and a Linear over `CHUNK_ELEMENTS` elements as one chunk
  of output rows; a tied weight counts for each module that uses it. None under `sequential`
  and `fused` (they displace θ in place) and none counted with a PEFT adapter (only the
  adapter's small matrices are copied; negligible);
- **buffers**: all of the model's buffers (rotary `inv_freq`, causal masks where a model
  keeps one); the offloader keeps every buffer on the compute device;
- **activations**: no gradients, no optimizer state (ZO-SGD), no stored activations: the
  largest transient working set of one no-grad forward and its loss
  (`block_working_set`, `head_working_set`: the head's logits follow `data.task`, every
  position for lm and sft, the last one for classification), or of one evaluation forward
  when the run evaluates (`eval_working_set`).

Host: nothing for a resident run. With offloading, one home copy of every block in the
weights' dtype (pinned on CUDA), plus the fp32 master copy of the 16-bit weights that keep
one (see above: none under `dual` with `auto`).

The forward is assumed to run with `use_cache=False`. transformers' default follows
`config.use_cache` (usually True), and then every layer's k and v stay alive to the end of
the forward and its loss: 2·L·B'·T·H_kv·head_dim more, on the compute device even with
offloading.

Not counted: the CUDA context and allocator slack, the noise (generated piecewise: in
registers with Triton, tens of MB of temporaries at most on the CPU's eager path),
rotary cos/sin and other tensors of B·T·head_dim or less, a PEFT adapter's own weights,
master copies and scratch (negligible; its frozen base has neither master copies nor
scratch). `benchmarks/planner_check.py` compares the estimates with measurements.
"""

from __future__ import annotations

import difflib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from zotune.blocks import find_blocks
from zotune.errors import UserError
from zotune.models import DTYPES, _head, _import_gguf_package, gguf_cache_dir
from zotune.precision import MASTER_WEIGHTS, keeps_master
from zotune.scratch import CHUNK_ELEMENTS, scratch_bytes
from zotune.schema import Recipe
from zotune.settings import SCHEDULES, ZOSettings

GIB = 2**30
GB = 10**9
# data.task -> what its loss scores (head_working_set)
LOSSES = {"lm": "the LM loss", "sft": "the LM loss", "classification": "the last position's label words scored"}
# attention implementations that build the B·H·T·T scores: transformers' eager code and the
# math fallback of torch's SDPA; "sdpa" means its flash / memory-efficient kernels
MATERIALISING = ("eager", "math")
# activations written as several elementwise ops keep this many more B·T·F tensors alive
COMPOSITE_ACTIVATIONS = {"gelu_new": 2}


def _opt(hidden: int, layers: int, heads: int) -> tuple[str, dict]:
    return "opt", dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=4 * hidden,
        vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=hidden,
    )


def _llama(hidden: int, layers: int, heads: int, intermediate: int) -> tuple[str, dict]:
    return "llama", dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
        intermediate_size=intermediate, vocab_size=128256, max_position_embeddings=8192,
    )


# name -> (model_type, config fields), from the published architectures (OPT paper, Llama 3 configs)
KNOWN_CONFIGS = {
    "opt-1.3b": _opt(2048, 24, 32),
    "opt-2.7b": _opt(2560, 32, 32),
    "opt-6.7b": _opt(4096, 32, 32),
    "opt-13b": _opt(5120, 40, 40),
    "opt-30b": _opt(7168, 48, 56),
    "opt-66b": _opt(9216, 64, 72),
    "opt-175b": _opt(12288, 96, 96),
    "llama-3-8b": _llama(4096, 32, 32, 14336),
    "llama-3-70b": _llama(8192, 80, 64, 28672),
}


@dataclass(frozen=True)
class Dims:
    """The sizes of a config that the activation estimate needs."""

    hidden: int  # D
    heads: int  # H
    kv_heads: int
    head_dim: int
    intermediate: int  # F
    vocab: int  # V
    mlp_live: int  # B·T·F tensors alive at the MLP's peak
    gated: bool  # a gated MLP (act(gate) · up)
    softcapped: bool  # the logits are soft-capped (config.final_logit_softcapping)
    qkv_kept: bool  # a fused qkv projection's output stays alive beside the rotated q and k


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes on the compute device and on the host at the peak of one ZO step."""

    config_name: str
    batch_size: int
    seq_len: int
    dtype: str
    schedule: str
    offload: bool
    transfer_dtype: str | None
    buffers: int  # blocks in flight when offloading (at most all of them)
    attention: str
    master_weights: str  # zo.master_weights: auto, fp32 or none
    adapter: bool  # a PEFT adapter trains: the base weights are frozen
    task: str  # data.task: what the head scores (head_working_set)
    param_count: int
    resident_param_bytes: int  # embeddings, final norm, head (tied weights once)
    block_param_bytes: tuple[int, ...]  # one entry per block, in the weight dtype
    compute_params: int
    compute_master: int
    compute_buffers: int
    compute_scratch: int  # the largest module's perturbed copies under dual (zotune.scratch)
    block_activations: int
    head_activations: int
    eval_batch_size: int | None  # per_device_eval_batch_size when the run evaluates, else None
    eval_activations: int  # the peak of one evaluation forward and its loss (eval_working_set)
    host_params: int
    host_master: int

    @property
    def total_param_bytes(self) -> int:
        return self.resident_param_bytes + sum(self.block_param_bytes)

    @property
    def compute_activations(self) -> int:
        """The larger of a step's and an evaluation's working set (the scratch, added to either in
        `compute_total`, is freed before an evaluation: an upper bound by the scratch)."""
        return max(self.block_activations, self.head_activations, self.eval_activations)

    @property
    def compute_total(self) -> int:
        return (self.compute_params + self.compute_master + self.compute_buffers + self.compute_scratch
                + self.compute_activations)

    @property
    def host_total(self) -> int:
        return self.host_params + self.host_master

    def assumptions(self) -> str:
        rows = 2 * self.batch_size if self.schedule == "dual" else self.batch_size
        scores = "T×T scores materialised" if self.attention in MATERIALISING else "no T×T scores"
        if self.offload:
            sent = f", sent as {self.transfer_dtype}" if self.transfer_dtype else ""
            where = f"offload: {self.buffers} blocks on the compute device{sent}, all blocks at home on the host"
        else:
            where = "resident: every weight on the compute device"
        if self.adapter:
            master = "PEFT adapter: frozen base weights, no master copies or scratch (the adapter's own negligible)"
        else:
            if self.dtype == "float32":
                master = "fp32 weights need no master copy"
            elif self.compute_master or self.host_master:
                master = f"master_weights {self.master_weights}: an fp32 master copy beside each 16-bit weight"
            else:
                master = f"master_weights {self.master_weights}: no master copy of the 16-bit weights"
            if self.schedule == "dual":
                scratch = ("perturbed copies of the largest module's own weights for its call (an embedding's "
                           f"looked-up rows, a Linear over {CHUNK_ELEMENTS} elements one chunk of rows at a time)")
            else:
                scratch = f"no perturbed copies (the {self.schedule} schedule moves the weights in place)"
            master = f"{master}; {scratch}"
        evaluation = "no evaluation"
        if self.eval_batch_size is not None:
            evaluation = (f"evaluation forwards of {self.eval_batch_size} sequences with the model's own loss "
                          f"({self.eval_activations / GIB:.2f} GiB at their peak)")
        return (
            f"{self.config_name}, {self.param_count / 1e9:.2f}B parameters in {self.dtype}; {self.schedule} schedule: "
            f"forwards of {rows} sequences × {self.seq_len} tokens with {LOSSES[self.task]}, use_cache=False; "
            f"{evaluation}; "
            f"{self.attention} attention ({scores}); {where}; {master}; no CUDA context or allocator slack"
        )


def plan_memory(
    config: PreTrainedConfig,
    *,
    batch_size: int,
    seq_len: int,
    dtype: str | torch.dtype,
    offload: bool = False,
    transfer_dtype: str | torch.dtype | None = None,
    schedule: str = ZOSettings.model_fields["schedule"].default,
    buffers: int = 3,
    attention: str | None = None,
    master_weights: str = ZOSettings.model_fields["master_weights"].default,
    adapter: bool = False,
    task: str = "lm",
    eval_batch_size: int | None = None,
) -> MemoryPlan:
    """The memory of one ZO step of the causal LM `config` describes (see the module docstring).

    `batch_size` is the micro-batch B; the dual schedule runs 2B sequences in one forward and
    computes each half's loss separately, sequential and fused run B. `buffers` is the number
    of blocks in flight on the compute device when offloading (3 on CUDA; on the CPU a block is
    written back before the next is prefetched, so 2). `attention` defaults to the
    implementation transformers picks for the config (usually "sdpa"); "eager" and "math"
    materialise the attention scores. `master_weights` is `zo.master_weights`
    (`zotune.precision`; the update taken as ZO-SGD's, stochastically rounded). `adapter=True`
    when only a PEFT adapter trains: the base weights get neither master copies nor scratch.
    `task` is `data.task`: lm and sft score every position, classification only the last one's
    label words (`head_working_set`). `eval_batch_size`: the run evaluates, in batches of this
    many sequences (`eval_working_set`); the final evaluation of `zotune train` may be its peak.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if task not in LOSSES:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(LOSSES)}")
    if master_weights not in MASTER_WEIGHTS:
        raise ValueError(f"unknown master_weights {master_weights!r}; choose one of {', '.join(MASTER_WEIGHTS)}")
    dtype = _dtype(dtype)
    transfer_dtype = _dtype(transfer_dtype) if offload and transfer_dtype is not None else None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    attention = attention or model.config._attn_implementation
    _, blocks = find_blocks(model)
    block_params = [list(b.parameters()) for b in blocks]
    in_blocks = {id(p) for ps in block_params for p in ps}
    resident = [p for p in model.parameters() if id(p) not in in_blocks]
    resident_bytes = sum(_nbytes(p) for p in resident)
    block_bytes = [sum(_nbytes(p) for p in ps) for ps in block_params]
    # the largest blocks bound the ones in flight (blocks are usually all the same size)
    in_flight = sorted(range(len(blocks)), key=block_bytes.__getitem__, reverse=True)[:buffers]

    def master_bytes(params) -> int:
        if adapter:
            return 0
        return sum(4 * p.numel() for p in params if keeps_master(master_weights, schedule, p.dtype, True))

    rows = 2 * batch_size if schedule == "dual" else batch_size
    dims = _dims(config, model, blocks[0])
    size = dtype.itemsize
    common = dict(
        config_name=getattr(config, "name_or_path", None) or config.model_type,
        batch_size=batch_size, seq_len=seq_len, dtype=_name(dtype), schedule=schedule, offload=offload,
        transfer_dtype=_name(transfer_dtype) if transfer_dtype is not None else None, buffers=len(in_flight),
        attention=attention, master_weights=master_weights, adapter=adapter, task=task,
        param_count=sum(p.numel() for p in model.parameters()),
        resident_param_bytes=resident_bytes, block_param_bytes=tuple(block_bytes),
        compute_buffers=sum(_nbytes(b) for b in model.buffers()),
        compute_scratch=0 if adapter or schedule != "dual" else largest_scratch(model, min(dims.vocab, rows * seq_len)),
        block_activations=block_working_set(dims, rows, seq_len, size, attention in MATERIALISING),
        head_activations=head_working_set(dims, batch_size, seq_len, size, dual=schedule == "dual", task=task),
        eval_batch_size=eval_batch_size,
        eval_activations=0 if eval_batch_size is None else eval_working_set(
            dims, eval_batch_size, seq_len, size, attention in MATERIALISING, task),
    )
    if not offload:
        return MemoryPlan(**common, compute_params=resident_bytes + sum(block_bytes),
                          compute_master=master_bytes(model.parameters()), host_params=0, host_master=0)
    arriving = 0  # a tensor sent in the transfer dtype exists in both dtypes until the cast back
    if transfer_dtype is not None and transfer_dtype != dtype:
        arriving = transfer_dtype.itemsize * max(p.numel() for ps in block_params for p in ps)
    return MemoryPlan(
        **common,
        compute_params=resident_bytes + sum(block_bytes[i] for i in in_flight) + arriving,
        compute_master=master_bytes(resident),
        host_params=sum(block_bytes),
        host_master=master_bytes(p for ps in block_params for p in ps),
    )


def block_dims(config: PreTrainedConfig, dtype: str | torch.dtype) -> Dims:
    """The sizes of `config` that the activation estimates need (its model built on the meta device)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=_dtype(dtype))
    _, blocks = find_blocks(model)
    return _dims(config, model, blocks[0])


def largest_scratch(model: torch.nn.Module, rows_looked_up: int) -> int:
    """The peak bytes of perturbed copies of one module call under dual: the largest `scratch_bytes`
    of any module with its own parameters (each taken to train; a tied weight counts for each
    module that uses it), an Embedding looking up `rows_looked_up` distinct rows."""
    return max((scratch_bytes(m, own, rows_looked_up) for m in model.modules()
                if (own := list(m.parameters(recurse=False)))), default=0)


def block_working_set(dims: Dims, rows: int, seq: int, size: int, materialise: bool) -> int:
    """Bytes alive at the peak of one block's no-grad forward over `rows` sequences of `seq` tokens.

    Four B'·T·D tensors are alive throughout: the embeddings (kept by the model's forward), the
    block's input (kept by its caller), the residual after attention and the normed copy
    (GPT-2 and OPT keep one or two more: position embeddings, attention output). Plus the larger of
    - attention: q, k and v, B'·T·(H + 2H_kv)·head_dim (with a fused qkv projection and rotary
      embeddings, as in GPT-NeoX and Phi-3, the rotated q and k as well), then either the
      attention output twice (the kernel's and its contiguous transpose), or, when the scores
      are materialised, at the softmax: the additive mask B'·T·T, the scores and the probabilities B'·H·T·T (via
      an fp32 softmax for 16-bit weights, as Llama-style eager code does) and, for grouped
      queries, k and v repeated to H heads;
    - MLP: `dims.mlp_live` tensors of B'·T·F (a gated MLP's act(gate), up and their product),
      and the materialised probabilities, which the attention returns and the layer keeps.
    """
    tokens = rows * seq
    stream = 4 * tokens * dims.hidden * size
    qkv_heads = dims.heads + 2 * dims.kv_heads
    if dims.qkv_kept:
        qkv_heads += dims.heads + dims.kv_heads  # the rotated q and k beside the fused projection's output
    qkv = tokens * qkv_heads * dims.head_dim * size
    kept = 0
    if materialise:
        scores = rows * dims.heads * seq * seq * (2 * size + (4 if size < 4 else 0))
        repeated = 2 * tokens * dims.heads * dims.head_dim * size if dims.kv_heads < dims.heads else 0
        attention = qkv + rows * seq * seq * size + scores + repeated
        kept = rows * dims.heads * seq * seq * size
    else:
        attention = qkv + 2 * tokens * dims.heads * dims.head_dim * size
    mlp = kept + dims.mlp_live * tokens * dims.intermediate * size
    return stream + max(attention, mlp)


def head_working_set(dims: Dims, batch: int, seq: int, size: int, dual: bool, task: str = "lm") -> int:
    """Bytes alive at the peak of the LM head and the loss.

    classification (`zotune.data`): the collator passes `logits_to_keep=1`, so the head computes
    the last position's logits only, B'·V, and the loss reads the label words' few logits of them.

    lm, sft, sequential / fused: the logits of B sequences, B·T·V in the weights' dtype, plus the
    model's own loss over them: the logits upcast to fp32 (16-bit weights only) and their fp32
    log-softmax.

    lm, sft, dual: the logits of all 2B sequences. The head (a Linear) writes each half's product
    straight into the joined logits (`zotune.dual`), a head over more than `CHUNK_ELEMENTS` weights
    one chunk of output rows at a time. Each half's loss is taken over chunks of rows
    (`zotune.dual.causal_lm_loss`): one chunk's fp32 upcast and log-softmax.

    A model with `final_logit_softcapping` (Gemma 2 and 3) computes cap·tanh(logits/cap) in three
    out-of-place steps, each holding the logits twice.
    """
    rows = (2 if dual else 1) * batch
    softcap = 2 if dims.softcapped else 1
    if task == "classification":
        return softcap * rows * dims.vocab * size
    logits = rows * seq * dims.vocab * size
    if not dual:
        return max(softcap * logits, logits + batch * seq * dims.vocab * (4 + (4 if size < 4 else 0)))
    chunk = min(batch * seq, max(1, CHUNK_ELEMENTS // dims.vocab)) * dims.vocab
    return max(softcap * logits, logits + chunk * (4 + (4 if size < 4 else 0)))


def eval_working_set(dims: Dims, batch: int, seq: int, size: int, materialise: bool, task: str) -> int:
    """Bytes alive at the peak of one evaluation forward of `batch` sequences and its loss: no
    perturbation and no doubling, the model's own loss over its logits, as a sequential step's
    (`head_working_set`); the Trainer keeps no logits across batches unless it computes metrics,
    and the classification metrics keep only the label words' logits."""
    return max(block_working_set(dims, batch, seq, size, materialise),
               head_working_set(dims, batch, seq, size, dual=False, task=task))


def known_config(name: str) -> PreTrainedConfig:
    """The config of a KNOWN_CONFIGS entry; a UserError with a suggestion for any other name."""
    if name not in KNOWN_CONFIGS:
        message = f"unknown model {name!r}"
        close = difflib.get_close_matches(name.lower(), list(KNOWN_CONFIGS), n=1)
        if close:
            message += f"; did you mean '{close[0]}'?"
        raise UserError(message + f"\nknown models: {', '.join(KNOWN_CONFIGS)}, or a local model directory")
    model_type, fields = KNOWN_CONFIGS[name]
    config = AutoConfig.for_model(model_type, **fields)
    config.name_or_path = name
    return config


def model_config(name_or_path: str) -> PreTrainedConfig:
    """A KNOWN_CONFIGS name, or a local directory holding a config.json."""
    if Path(name_or_path).expanduser().is_dir():
        return _pretrained_config(str(Path(name_or_path).expanduser()), "--model")
    return known_config(name_or_path)


def recipe_config(recipe: Recipe) -> PreTrainedConfig:
    """The model config a recipe names, read without loading weights.

    A GGUF already converted for training is read from the conversion cache; otherwise the
    config is read from the GGUF file itself (a `gguf_package` is assembled into a temporary
    folder for that).
    """
    section = recipe.model
    if section.config is not None:
        fields = dict(section.config)
        model_type = fields.pop("model_type", None)
        try:
            config = AutoConfig.for_model(model_type, **fields)
        except Exception as e:  # unknown model type, and transformers' strict field validation
            raise UserError(f"model.config: {e}") from e
    elif section.gguf_file is None and section.gguf_package is None:
        config = _pretrained_config(section.name_or_path, "model.name_or_path", section.trust_remote_code)
    elif gguf_cache_dir(section).is_dir():
        config = _pretrained_config(str(gguf_cache_dir(section)), "model")
    elif section.gguf_package is not None:
        with tempfile.TemporaryDirectory() as tmp:
            gguf = Path(_import_gguf_package(section.gguf_package).assemble(Path(tmp) / "model.gguf"))
            config = _pretrained_config(str(gguf.parent), "model.gguf_package", gguf_file=gguf.name)
    else:
        gguf = Path(section.gguf_file).expanduser()
        if section.name_or_path is not None:
            gguf = Path(section.name_or_path).expanduser() / gguf
        config = _pretrained_config(str(gguf.parent), "model.gguf_file", gguf_file=gguf.name)
    if _head(config, num_labels=2) is not AutoModelForCausalLM:
        raise UserError(f"model: {config.model_type} is not a causal LM; the planner covers causal LMs only")
    return config


def recipe_settings(recipe: Recipe) -> dict:
    """plan_memory's keyword arguments as the recipe sets them."""
    if recipe.method != "zo":
        raise UserError("method: the planner plans ZO runs; a first-order (fo) run also holds gradients and "
                        "optimizer state")
    return dict(
        batch_size=recipe.train.per_device_train_batch_size,
        seq_len=recipe.data.block_size if recipe.data.task == "lm" else recipe.data.max_length,
        dtype=recipe.model.dtype,
        schedule=recipe.zo.schedule,
        offload=recipe.zo.offload == "cpu",
        transfer_dtype=recipe.zo.offload_transfer_dtype,
        master_weights=recipe.zo.master_weights,
        adapter=recipe.model.peft is not None,
        task=recipe.data.task,
        eval_batch_size=recipe.train.per_device_eval_batch_size if recipe.data.eval is not None else None,
    )


def _pretrained_config(path: str, key: str, trust_remote_code: bool = False, **kwargs) -> PreTrainedConfig:
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"{key}: cannot load a model config from {path!r}: {e}") from e


def _dims(config: PreTrainedConfig, model: torch.nn.Module, block: torch.nn.Module) -> Dims:
    hidden = _field(config, "hidden_size", "n_embd", "d_model")
    heads = _field(config, "num_attention_heads", "n_head")
    kv_heads = _field(config, "num_key_value_heads", default=heads)
    head_dim = _field(config, "head_dim", default=hidden // heads)
    intermediate = _field(config, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden)
    matrices = [p for p in block.parameters() if p.dim() == 2]
    mlp = [p for p in matrices if {intermediate, 2 * intermediate} & set(p.shape)]
    # a gated MLP's weights (gate, up, down; or fused gate_up and down) hold 3·D·F, a plain one 2·D·F;
    # a fused gate_up's 2·F output stays alive beside act(gate) and the product
    gated = sum(p.numel() for p in mlp) >= 3 * hidden * intermediate
    fused_gate_up = gated and any(2 * intermediate in p.shape for p in mlp)
    # the other matrices are the attention's: q, k, v and o, or a fused qkv and o
    fused_qkv = len(matrices) - len(mlp) <= 2
    rotary = any("Rotary" in type(m).__name__ for m in model.modules())
    activation = _field(config, "hidden_act", "hidden_activation", "activation_function", default="")
    return Dims(
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        vocab=config.vocab_size,
        mlp_live=(3 if gated else 2) + fused_gate_up + COMPOSITE_ACTIVATIONS.get(activation, 0),
        gated=gated,
        qkv_kept=fused_qkv and rotary,
        softcapped=getattr(config, "final_logit_softcapping", None) is not None,
    )


def _field(config: PreTrainedConfig, *names: str, default=None):
    """The first of `names` that the config sets (not None)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    if default is None:
        raise UserError(f"{config.model_type} config has none of {', '.join(names)}")
    return default


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
