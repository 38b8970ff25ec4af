"""qlora-lab's Triton varlen attention kernels, run on the CPU by Triton's interpreter.

The interpreter executes the kernels' own code (tile mapping, masks, online softmax, the three
backward kernels) with numpy, so the CPU checks what the GPU runs, against attention computed
one row at a time in fp32. It needs triton >= 3.9 (earlier interpreters cannot loop to a bound
loaded from memory) and does not do bf16 matmuls (numpy has no bf16): fp32 and fp16 here; the
GPU test in test_fastpath.py covers bf16 on CUDA. `make install` puts triton in a folder of its
own (.venv/triton-interpreter), and each check runs in a child process with TRITON_INTERPRET=1
set before triton is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRITON_DIR = ROOT / ".venv" / "triton-interpreter"

CHECK = r'''
import json, sys
import torch
from qlora_lab import triton_attention as ta

def run(lengths, heads, kv_heads, dim, dtype, tiles, compiled):
    ta.TILES_OVERRIDE = None if tiles is None else ta.Tiles(*tiles)
    torch.manual_seed(len(lengths) * 7 + dim)
    dtype = getattr(torch, dtype)
    tokens = sum(lengths)
    bounds = torch.tensor([0] + list(torch.tensor(lengths, dtype=torch.long).cumsum(0)),
                          dtype=torch.int32)
    q, k, v = (torch.randn(tokens, h, dim, dtype=dtype, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(tokens, heads, dim, dtype=dtype)
    attend = ta.varlen_attention
    if compiled:
        attend = torch.compile(lambda a, b, c, r: ta.varlen_attention(a, b, c, r), fullgraph=True)
    out = attend(q, k, v, bounds)
    out.backward(grad)
    got = [out.detach().float()] + [t.grad.float() for t in (q, k, v)]
    leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref = ta.reference(*leaves, bounds)
    ref.backward(grad.float())
    want = [ref.detach()] + [t.grad for t in leaves]
    return {"errors": [float((a - b).abs().max()) if a.numel() else 0.0
                       for a, b in zip(got, want)],
            "scales": [float(b.abs().max()) if b.numel() else 0.0 for b in want],
            "shapes_ok": [tuple(a.shape) == tuple(b.shape) for a, b in zip(got, want)]}

print(json.dumps([run(*case) for case in json.loads(sys.argv[1])]))
'''

# (row lengths, query heads, K/V heads, head dim, dtype, tiles or None (the default), compiled)
CASES = [
    # grouped heads; rows shorter than, equal to and longer than a tile; a one-token row
    ([5, 70, 1, 130, 64, 3], 4, 2, 32, "float32", None, False),
    # a head dim that is not a power of two, tiles of 32, 3 pipeline stages, one K/V head
    ([33, 1, 17, 40], 4, 1, 24, "float32", (32, 4, 3), False),
    # no grouping, an empty row among others, 16-token tiles
    ([7, 0, 9, 48], 2, 2, 16, "float32", (16, 4, 2), False),
    # half precision: fp32 accumulation, fp16 tiles
    ([40, 90], 4, 2, 32, "float16", None, False),
    # inside a compiled function (the op and its autograd formula as compiled layers see them)
    ([5, 70, 30], 4, 2, 16, "float32", None, True),
    # a group of 3 query heads (padded to 4 in the forward's tiles), forward tiles of 8 tokens
    ([3, 50, 21], 6, 2, 16, "float32", (16, 4, 2, 32), False),
    # a group wider than the forward tile's rows: one token a tile
    ([9, 20], 32, 1, 16, "float32", (16, 4, 2, 16), False),
]


def _interpreter_env() -> dict | None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    paths = [str(ROOT / "src")]
    if TRITON_DIR.is_dir():
        paths.insert(0, str(TRITON_DIR))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    probe = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"],
                           env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        return None
    major, minor = (int(x) for x in probe.stdout.strip().split(".")[:2])
    return env if (major, minor) >= (3, 9) else None


@pytest.fixture(scope="module")
def interpreter():
    env = _interpreter_env()
    if env is None:
        pytest.skip("needs triton >= 3.9 for its interpreter (`make install` puts it in "
                    ".venv/triton-interpreter)")
    return env


def test_triton_kernels_equal_row_by_row_attention(interpreter):
    done = subprocess.run([sys.executable, "-c", CHECK, json.dumps(CASES)], env=interpreter,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == len(CASES)
    for case, result in zip(CASES, results):
        assert all(result["shapes_ok"]), case
        tolerance = 2e-3 if case[4] == "float16" else 2e-5
        for name, error, scale in zip(("out", "dq", "dk", "dv"), result["errors"],
                                      result["scales"]):
            assert scale == 0.0 or error <= tolerance * max(1.0, scale), (case, name, error)


def test_tile_map_places_every_token_in_one_tile():
    import torch

    from qlora_lab import triton_attention as ta

    lengths = [5, 0, 64, 65, 1, 128]
    bounds = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    tokens = sum(lengths)
    for block in (64, 16, 1):
        table = ta._tile_map(bounds, block, tokens)
        # the grid, from shapes alone, covers every tile: the rest are empty (length 0)
        assert table.shape == (ta._grid_tiles(tokens, len(lengths), block), 3)
        used = table[table[:, 1] > 0].tolist()
        assert all(length == 0 for _, length, _ in table[len(used):].tolist())
        # ceil(length / block) tiles a row, in row order, each starting at a multiple of block
        want = [[start, length, pos] for start, length in zip(bounds.tolist(), lengths)
                for pos in range(0, length, block)]
        assert used == want, block


def test_op_names_change_with_the_source():
    """torch.compile's on-disk caches know a custom op by name: a changed autograd formula
    under an old name would reuse a backward traced from the old one (pytorch#144344)."""
    import hashlib

    import torch

    from qlora_lab import triton_attention as ta

    src = Path(ta.__file__).parent
    want = hashlib.sha256((src / "triton_attention.py").read_bytes()
                          + (src / "_attention_kernels.py").read_bytes()).hexdigest()[:12]
    assert ta.OP_TAG == want
    for op in ("fwd", "bwd"):
        assert hasattr(torch.ops.qlora_lab, f"varlen_attention_{op}_{want}")


def test_varlen_kernel_choice_falls_back_or_refuses_without_a_gpu():
    import torch

    from qlora_lab import attention
    from qlora_lab.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("checks the CPU's answer")
    assert attention.triton_runs(64, torch.bfloat16) is not None
    assert attention.plan_kernel(True, "auto") is None  # masked SDPA computes it instead
    with pytest.raises(UserError, match="model.varlen_kernel"):
        attention.plan_kernel(True, "triton")


def test_train_refuses_the_triton_kernel_where_it_cannot_run(tmp_path, dolly_file):
    from dataclasses import replace

    import torch

    from qlora_lab.errors import UserError
    from qlora_lab.train import setup_training

    if torch.cuda.is_available():
        pytest.skip("checks the CPU's answer")
    from conftest import tiny_config

    cfg = tiny_config(tmp_path / "run", dolly_file)
    cfg = replace(cfg, model=replace(cfg.model, attn_implementation="varlen",
                                     varlen_kernel="triton"))
    with pytest.raises(UserError, match="model.varlen_kernel = 'triton' cannot run here"):
        setup_training(cfg)
    # auto falls back: the CPU computes varlen attention with masked SDPA
    auto = replace(cfg, model=replace(cfg.model, varlen_kernel="auto"),
                   train=replace(cfg.train, output_dir=str(tmp_path / "auto")))
    assert setup_training(auto).model.config._attn_implementation == "qlora_varlen"
