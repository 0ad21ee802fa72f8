"""Parameter bytes a rank holds under `zo.shard: fsdp`, against the whole model, for N ranks.

    python benchmarks/fsdp_memory.py --ranks 2 4 > benchmarks/results/fsdp_memory.txt

A Llama-shaped model from config (untied embeddings), N gloo processes on this machine, two ZO steps
through the sharded optimizer; `zotune.fsdp.ResidentParameters` takes the peak at every module's
forward. The bound it is compared with: the rank's slices plus the largest unit plus the root's own
weights (the final norm), which stay gathered through the forward.
"""

from __future__ import annotations

import argparse
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoConfig, AutoModelForCausalLM

import host
from zotune.blocks import find_blocks
from zotune.fsdp import ResidentParameters, shard_model
from zotune.optim import ZOOptimizer

CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=16, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False)


def build():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **CONFIG)).eval()


def nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _rank(rank: int, world: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = build()
        resident = ResidentParameters(model, shard_model(model))
        opt = ZOOptimizer(list(model.named_parameters()), lr=1e-4, eps=1e-3, schedule="fused")
        ids = torch.randint(0, CONFIG["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for step in range(2):
                opt.estimate(lambda: model(input_ids=ids, labels=ids).loss.item(), step)
                opt.step()
        out[rank] = (resident.slices, resident.peak)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    model = build()
    blocks = list(find_blocks(model)[1])
    units = [nbytes(b) for b in blocks] + [nbytes(model.get_input_embeddings()), nbytes(model.get_output_embeddings())]
    whole, root = nbytes(model), nbytes(model) - sum(units)
    print(host.line(1))  # each rank's threads
    print(f"Llama from config {CONFIG}: {whole / 2**20:.1f} MiB of fp32 weights; largest unit "
          f"{max(units) / 2**20:.1f} MiB, root's own {root / 2**10:.1f} KiB")
    print("| ranks | slices (MiB) | peak (MiB) | peak ÷ whole | bound: slices + largest unit + root (MiB) |")
    print("|---:|---:|---:|---:|---:|")
    for world in args.ranks:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = mp.Manager().dict()
        mp.spawn(_rank, args=(world, port, out), nprocs=world, join=True)
        slices, peak = max(out.values(), key=lambda v: v[1])
        print(f"| {world} | {slices / 2**20:.1f} | {peak / 2**20:.1f} | {peak / whole:.3f} | "
              f"{(slices + max(units) + root) / 2**20:.1f} |")


if __name__ == "__main__":
    main()
