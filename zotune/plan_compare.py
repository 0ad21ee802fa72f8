"""`zotune plan --compare`: a ZO step beside the first-order ways to fine-tune the same model.

For one config, dtype, micro-batch B and length T (nothing allocated, as `zotune.plan`), the
peak bytes on the compute device of:

- **ZO dual**, resident and offloaded, and **ZO fused** (in place): `zotune.plan.plan_memory`
  with the given `master_weights`;
- **AdamW**, full-parameter: the weights, their gradients and AdamW's two moments in fp32,
  and for 16-bit weights an fp32 master (mixed precision): 16 bytes per parameter either way
  (4+4+8, or 2+2+4+8; ZeRO counts the same 16, Rajbhandari et al. 2020, arXiv:1910.02054,
  §3.1). Plus the activations backward needs (`stored_block`, every block) and the head's;
- **AdamW + gradient checkpointing**: each block keeps only its input; one block's
  activations are recomputed at a time during backward;
- **LoRA**: the frozen weights in their dtype and the activations backward needs (it runs
  through every block); the adapter's own weights and state are taken as negligible;
- **QLoRA**: the blocks' weights in 4-bit NF4 with double quantisation, 4.127 bits per
  parameter (Dettmers et al. 2023, arXiv:2305.14314, §3), the rest in the dtype, with
  gradient checkpointing as the paper trains.

Activations backward needs, per token of one block (`stored_block`): the residual stream and
its normed copy before attention and before the MLP (4·D), q, k and v, the attention output
(the output projection's input), and the MLP's B·T·F tensors (act(gate), up and their product,
and the gate's output for a gated MLP; the activation's input and output otherwise; more for
an activation written as several ops); with eager attention the B·H·T·T probabilities too.
The head's: the logits, their fp32 upcast (16-bit), their log-softmax and its gradient.
Not counted: the CUDA context and allocator slack, the optimizer's transient buffers.
`tests/test_plan.py` holds every first-order row to real AdamW steps on the CPU (bitsandbytes
NF4 for QLoRA): the bytes beyond the weights within 25%.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedConfig

from zotune.models import DTYPES
from zotune.plan import MATERIALISING, Dims, block_dims, plan_memory
from zotune.settings import ZOSettings

ADAM_BYTES_PER_PARAM = 16  # weights + gradients + two fp32 moments (+ an fp32 master for 16-bit weights)
NF4_BITS = 4.127  # QLoRA's NF4 with double quantisation, bits per parameter


@dataclass(frozen=True)
class Row:
    method: str
    compute: int  # bytes on the compute device at the peak
    host: int  # bytes on the host (offloading only)
    note: str
    weights: int  # of `compute`, the model's weights (quantized for QLoRA; the blocks in flight offloaded)


def compare(config: PreTrainedConfig, *, batch_size: int, seq_len: int, dtype: str,
            master_weights: str = ZOSettings.model_fields["master_weights"].default,
            attention: str | None = None, buffers: int = 3) -> list[Row]:
    """The rows of the comparison (see the module docstring)."""
    common = dict(batch_size=batch_size, seq_len=seq_len, dtype=dtype, attention=attention,
                  master_weights=master_weights)
    dual = plan_memory(config, **common)
    offloaded = plan_memory(config, **common, offload=True, buffers=buffers)
    fused = plan_memory(config, **common, schedule="fused")
    dims, size = block_dims(config, dtype), DTYPES[dtype].itemsize
    tokens, layers = batch_size * seq_len, len(dual.block_param_bytes)
    materialise = dual.attention in MATERIALISING
    block = stored_block(dims, batch_size, seq_len, size, materialise)
    head = tokens * dims.vocab * (2 * size + 8 + (4 if size < 4 else 0))
    weights = dual.total_param_bytes
    adam = ADAM_BYTES_PER_PARAM * dual.param_count
    checkpointed = layers * tokens * dims.hidden * size + block
    quantised = dual.resident_param_bytes + round(sum(dual.block_param_bytes) / size * NF4_BITS / 8)
    return [
        Row("ZO dual", dual.compute_total, 0, "forwards only, θ never displaced", dual.compute_params),
        Row("ZO dual, offloaded", offloaded.compute_total, offloaded.host_total,
            f"{offloaded.buffers} blocks on the device", offloaded.compute_params),
        Row("ZO fused (in place)", fused.compute_total, 0, f"master_weights {master_weights}", fused.compute_params),
        Row("AdamW", adam + layers * block + head + dual.compute_buffers, 0, "16 bytes per parameter", weights),
        Row("AdamW + gradient checkpointing", adam + checkpointed + head + dual.compute_buffers, 0,
            "block inputs kept, one block recomputed", weights),
        Row("LoRA", weights + layers * block + head + dual.compute_buffers, 0, "frozen base, adapter negligible",
            weights),
        Row("QLoRA", quantised + checkpointed + head + dual.compute_buffers, 0,
            f"blocks in NF4 ({NF4_BITS} bits), gradient checkpointing", quantised),
    ]


def stored_block(dims: Dims, batch: int, seq: int, size: int, materialise: bool) -> int:
    """Bytes one block keeps for backward over `batch` sequences of `seq` tokens (module docstring)."""
    per_token = (4 * dims.hidden + (2 * dims.heads + 2 * dims.kv_heads) * dims.head_dim
                 + (dims.mlp_live + dims.gated) * dims.intermediate)
    scores = batch * dims.heads * seq * seq if materialise else 0
    return (batch * seq * per_token + scores) * size


def fits(row: Row, budget_gb: float) -> bool:
    return row.compute <= budget_gb * 10**9

