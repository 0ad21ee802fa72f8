"""Helpers shared by several test files (fixtures live in conftest.py).

Test files import from here, never from each other.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_causal_lm, tiny_config
from datasets import Dataset
from safetensors.torch import load_file
from transformers import default_data_collator

from zotune.models import byte_tokenizer
from zotune.reward.population import Generation
from zotune.reward.trainer import ZORewardTrainer
from zotune.settings import ZOSettings
from zotune.trainer import ZOConfig, ZOTrainer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NOISE = ZOSettings().perturbation  # the noise kind of a run that sets none
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")

# -- recipes -------------------------------------------------------------------------------------

CONFIG = """\
  config: {model_type: llama, vocab_size: 300, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4,
           intermediate_size: 64}
"""
TINY = """\
# zotune train tiny.yaml
# A tiny random llama on a few rows, for tests.
method: zo
model:
""" + CONFIG + """\
data:
  task: classification
  train:
    path: train.jsonl
    max_samples: 64
  eval:
    path: validation.jsonl
    split: train
    max_samples: 32
  template: "{text} It was"
  verbalizer: {"0": " terrible", "1": " great"}
params:
  include: [layers]
zo:
  eps: 1e-3
  schedule: sequential
train:
  max_steps: 5
  learning_rate: 0.001
  output_dir: runs/tiny
"""


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def write_recipe(tmp_path: Path, **sections) -> Path:
    """A tiny llama run on rotten_tomatoes from ../shared/data; each of ``sections`` updates that section."""
    recipe = {
        "method": "zo",
        "model": {"config": tiny_config("llama")},
        "data": {
            "task": "classification",
            "train": {"path": str(DATA / "rotten_tomatoes/train.jsonl"), "max_samples": 64},
            "eval": {"path": str(DATA / "rotten_tomatoes/validation.jsonl"), "max_samples": 16},
            "template": "{text} It was",
            "verbalizer": {"0": "n", "1": "y"},  # one byte each: single tokens
            "balanced": True,
            "max_length": 48,
        },
        "zo": {"eps": 1e-2, "schedule": "fused"},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "learning_rate": 1e-3,
                  "per_device_train_batch_size": 4, "logging_steps": 2},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe[name], **values} if isinstance(values, dict) else values
    path = tmp_path / "recipe.yaml"
    path.write_text("# zotune train recipe.yaml\n" + yaml.safe_dump(recipe))
    return path


MOMENTUM_RUN_STEPS = 14


def write_momentum_recipe(root: Path, name: str, **train) -> Path:
    """A tiny llama run with a stateful rule (momentum) and a checkpoint every 3 steps, on 64 rows of its own."""
    data = root / "train.jsonl"
    if not data.exists():
        rows = [{"text": f"{'good' if i % 2 else 'bad'} movie number {i}", "label": i % 2} for i in range(64)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "method": "zo",
        "model": {"config": {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "intermediate_size": 64}},
        "data": {"task": "classification", "train": {"path": str(data)}, "template": "{text} It was",
                 "verbalizer": {"0": "n", "1": "y"}, "max_length": 32},
        "params": {"include": ["layers"]},
        "zo": {"eps": 1e-3, "schedule": "sequential", "rule": "momentum"},  # a rule with state to checkpoint
        # 64 rows in batches of 8: the run crosses an epoch, so resumes land mid-epoch too
        "train": {"output_dir": str(root / name), "max_steps": MOMENTUM_RUN_STEPS, "learning_rate": 1e-3,
                  "lr_scheduler_type": "linear", "per_device_train_batch_size": 8, "logging_steps": 100,
                  "save_strategy": "steps", "save_steps": 3, "evaluate_before": False, **train},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path



# -- ZOTrainer on a counting task --------------------------------------------------------------------

SEQ = 12


def counting_dataset(n: int = 32, seed: int = 0) -> Dataset:
    """Sequences that count up by 3 (mod 256): a task a tiny model can learn."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 256, (n,), generator=g)
    ids = (starts[:, None] + 3 * torch.arange(SEQ)) % 256
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), "attention_mask": [[1] * SEQ] * n})


def make_trainer(model, out, train=None, eval_dataset=None, **overrides) -> ZOTrainer:
    fields = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        zo_eps=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=0,
    )
    fields.update(overrides)
    return ZOTrainer(
        model=model,
        args=ZOConfig(**fields),
        train_dataset=train if train is not None else counting_dataset(),
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
    )


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def mean_loss(model, data: Dataset) -> float:
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in default_data_collator([data[i] for i in range(len(data))]).items()}
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- several processes: tests/test_data_parallel.py, tests/test_fsdp.py ----------------------------

WORKER = Path(__file__).with_name("dp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same(a: dict, b: dict, **tol):
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m: f"{name}: {m}", **tol)


def moved(before: dict, after: dict) -> float:
    return max((after[n] - p).abs().max().item() for n, p in before.items())


def assert_same_run(a: dict, b: dict, start: dict):
    """Equal up to float rounding: the union's loss is one mean in float32, the ranks' a weighted mean
    of two, and g = ΔL/2ε magnifies the last bits of L. A shard weighted wrongly (rows, not tokens,
    or the ranks averaged equally) is off by percents of the distance trained."""
    distance = moved(start, b)
    assert distance > 1e-3  # not two untrained models
    assert_same(a, b, rtol=0, atol=2e-3 * distance)


def launch(out: Path, nproc: int, runs: dict[str, dict], launcher: str = "torchrun") -> dict:
    """Run tests/dp_worker.py on `nproc` CPU processes, the `runs` (name -> the worker's fields) one after
    the other in one launch; {name: {rank: (facts, weights)}}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    else:  # accelerate's multi-process launcher, told to stay on the CPU
        env["ACCELERATE_USE_CPU"] = "true"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}",
                   "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
    port = ["--master_port" if launcher == "torchrun" else "--main_process_port", str(free_port())]
    specs = [run_spec(name, fields) for name, fields in runs.items()]
    done = subprocess.run([*command, *port, str(WORKER), str(out), *specs], env=env, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:  # the launcher's summary ends its stderr; a rank's own message comes before it
        out.mkdir(parents=True, exist_ok=True)
        (out / "launch.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n(the whole output: {out / 'launch.log'})"
    return {name: ranks_of(out / name, nproc) for name in runs}


def run_spec(name: str, fields: dict) -> str:
    """tests/dp_worker.py's RUN argument."""
    return f"{name}:" + ",".join(f"{key}={value}" for key, value in fields.items())


def ranks_of(out: Path, nproc: int) -> dict:
    """{rank: (facts, weights)} that tests/dp_worker.py wrote for one run."""
    return {r: (json.loads((out / f"rank{r}.json").read_text()), load_file(out / f"rank{r}.safetensors"))
            for r in range(nproc)}


# -- a reward run (tests/test_reward.py; tests/dp_worker.py trains it on two ranks) --

PROMPTS = ["say a", "abc", "the letter a, please:", "zz"]


def a_share(completions, **columns):
    """The share of a completion's characters that are its row's `letter` (trl's signature)."""
    return [c.count(letter) / max(1, len(c)) for c, letter in zip(completions, columns["letter"])]


def length_bonus(completions, prompts, **columns):
    return [len(c) / 100 for c in completions]


def prompts_dataset() -> Dataset:
    return Dataset.from_dict({"prompt": PROMPTS * 2, "letter": ["a", "b", "a", "z"] * 2})


def reward_trainer(out, schedule: str, seed: int = 0, functions=(a_share, length_bonus),
                   generation=Generation(max_new_tokens=5), **overrides):
    model = tiny_causal_lm("llama", seed=seed)
    args = ZOConfig(**{**dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=2e-3,
                              zo_eps=2e-2, zo_rule="es", zo_num_directions=2, zo_schedule=schedule,
                              lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                              use_cpu=True, disable_tqdm=True, train_sampling_strategy="sequential", seed=0),
                       **overrides})
    trainer = ZORewardTrainer(model=model, args=args, train_dataset=prompts_dataset(),
                              processing_class=byte_tokenizer(), reward_funcs=list(functions),
                              reward_weights=[1.0, 0.5][:len(functions)], generation=generation)
    return model, trainer


def reward_run(out, schedule: str, **overrides):
    """The run that tests/dp_worker.py trains on two ranks (`task=reward`): a population of q = 4; under
    dual all of it in one `generate`, sampled; in place (fused) greedy."""
    if schedule == "dual":
        overrides = {"zo_slice_directions": True, **overrides}
    temperature = 0.7 if schedule == "dual" else None
    return reward_trainer(out, schedule, zo_num_directions=4,
                          generation=Generation(max_new_tokens=5, temperature=temperature), **overrides)
