"""Peak memory of ZO on a 4-bit base + LoRA, as a ratio to 4-bit inference, each mode in its own process.

    python benchmarks/quantized.py        # Llama-style 170M model from config, nf4, LoRA r=8, batch 8x128, CPU

The base is built from a config, saved and reloaded through zotune's loader with bitsandbytes
nf4 (every linear layer of the blocks in 4 bits; embeddings and head in float32), then LoRA
(r=8 on q_proj, v_proj) is added. Loading peaks above training (the float32 checkpoint is read
before it is quantized), so each process trims the heap and resets its peak after loading (Linux `clear_refs`)
and reports the high-water mark of the steps alone, weights included.

Modes: float32 inference, 4-bit inference (no-grad forward with the loss), ZO `sequential`
and `dual` steps on the adapter, and a first-order step (backprop through the 4-bit base into
the adapter, AdamW): QLoRA.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
from pathlib import Path

import torch

import host
from separate import each_in_a_process
from raw_zo_step import zo_step_fn
from zotune.models import load_model
from zotune.schema import ModelSection

MODES = ["inference-fp32", "inference-4bit", "zo-sequential", "zo-dual", "fo-adamw"]
STEPS = 3
LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def config(args) -> dict:
    return {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": args.hidden * 11 // 4,
            "num_hidden_layers": args.layers, "num_attention_heads": 16, "num_key_value_heads": 16,
            "vocab_size": 32000, "max_position_embeddings": 512}


def status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_mode(mode: str, args) -> dict:
    torch.set_num_threads(args.threads)
    quantization = None if mode == "inference-fp32" else {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32"}
    section = ModelSection(config=config(args), quantization=quantization, peft=LORA)
    if mode.startswith("inference"):  # the base alone (a recipe must train something, so it cannot ask for this)
        section = section.model_copy(update={"peft": None})
    model, _ = load_model(section)
    model.eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (args.batch, args.seq))
    batch = {"input_ids": ids, "labels": ids}
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what loading freed, so RSS starts at what is held
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    loaded = status_bytes("VmRSS")
    if mode.startswith("inference"):
        for _ in range(STEPS):
            with torch.no_grad():
                model(**batch).loss.item()
    elif mode == "fo-adamw":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for _ in range(STEPS):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        step, _ = zo_step_fn(model, batch, mode.removeprefix("zo-"))
        for n in range(STEPS):
            step(n)
    return {"peak": status_bytes("VmHWM"), "loaded": loaded, "weights": weights, "trained": trained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args)))
        return

    results = each_in_a_process(__file__, "mode", MODES, args)
    base = results["inference-4bit"]["peak"]
    print(host.line(args.threads))
    print(f"Llama-style model from config: hidden {args.hidden}, {args.layers} layers, vocab 32000; "
          f"nf4 base, LoRA r=8 on q_proj/v_proj ({results['zo-dual']['trained']:,} trained parameters); "
          f"batch {args.batch}x{args.seq}, CPU, {args.threads} threads, peak over {STEPS} steps after loading")
    print("RSS after loading includes the Python process (torch, transformers); 'steps add' is the peak above it")
    print(f"{'mode':<16}{'weights MiB':>13}{'RSS loaded MiB':>16}{'peak RSS MiB':>14}{'steps add MiB':>15}"
          f"{'peak / 4-bit inference':>24}")
    for mode, r in results.items():
        print(f"{mode:<16}{r['weights'] / 2**20:>13.0f}{r['loaded'] / 2**20:>16.0f}{r['peak'] / 2**20:>14.0f}"
              f"{(r['peak'] - r['loaded']) / 2**20:>15.0f}{r['peak'] / base:>24.2f}")


if __name__ == "__main__":
    main()
