"""The Triton HSTU attention kernels (genrec.ops.triton_hstu) against the per-sequence reference, on CPU.

Triton's interpreter runs the kernels on CPU tensors, but only kernels defined while ``TRITON_INTERPRET=1`` is set, so
the parity cases run in one child process (this file run as a script, with the variable set) and report their errors
as JSON; the tests below read that report. Input checks run in the test process itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from genrec.ops import triton_hstu
from genrec.ops.hstu_math import LOG_BUCKET_BASE, time_buckets
from genrec.ops.jagged import jagged_hstu_attention_reference
from genrec.ops.triton_hstu import (
    KernelConfig,
    bucket_thresholds,
    triton_jagged_hstu_attention,
)

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton HSTU kernel tests need it "
                                              "(pip install -e '.[test]' on Linux x86-64)")  # fmt: skip
tl = pytest.importorskip("triton.language")

ROOT = Path(__file__).resolve().parents[2]
NUM_BUCKETS = 128
SMALL = KernelConfig(block_m=16, block_n=16, block_kv=16)  # several tiles per sequence at these lengths
MIXED = dict(lengths=[1, 17, 40, 0, 5, 33], has_time=[True, True, False, True, True, False])

# name -> inputs: lengths, head dims, which bias terms, has_time (None: the argument is None), norm ("seq": the
# sequence lengths, or a scalar), tile config (None: the default), dtype of q, k, v
CASES = {
    "both_terms_per_sequence_norm": dict(**MIXED, dqk=25, dv=25, pos=True, ts=True, norm="seq", config=SMALL),
    "both_terms_bucket_window_1": dict(**MIXED, dqk=25, dv=25, pos=True, ts=True, norm="seq",
                                       config=KernelConfig(16, 16, 16, ts_window=1)),
    "position_only_dqk_ne_dv_scalar_norm": dict(**MIXED, dqk=25, dv=12, pos=True, ts=False, norm=50.0,
                                                config=KernelConfig(block_m=32, block_n=16, block_kv=16)),
    "time_only_all_timed_wide_key_blocks": dict(lengths=[23, 1, 16], has_time=[True, True, True], dqk=25, dv=25,
                                                pos=False, ts=True, norm=40.0,
                                                config=KernelConfig(block_m=16, block_n=32, block_kv=32)),
    "no_bias": dict(lengths=[23, 1, 16], has_time=[True, True, True], dqk=25, dv=25, pos=False, ts=False,
                    norm="seq", config=SMALL),
    "has_time_none_no_time_term": dict(lengths=[23, 1, 16], has_time=None, dqk=25, dv=25, pos=True, ts=True,
                                       norm="seq", config=SMALL),
    "default_config": dict(**MIXED, dqk=25, dv=25, pos=True, ts=True, norm="seq", config=None),
    # half precision as fp16: the interpreter's tl.dot multiplies bf16 tiles as their raw uint16 storage
    "fp16": dict(lengths=[23, 1, 16], has_time=[True, False, True], dqk=25, dv=25, pos=True, ts=True, norm="seq",
                 config=SMALL, dtype="float16"),
}
FP32_TOL = 1e-5  # max |triton - reference| / max |reference|, per tensor
HALF_TOL = 1e-2


def make_inputs(lengths, has_time, dqk, dv, pos, ts, norm, dtype="float32", seed=0, **_):
    """A jagged batch, bias tables with large weights (so that a wrong bias shows), and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    T, h = sum(lengths), 2
    q, k = (torch.randn(T, h, dqk, generator=g) * 0.5 for _ in range(2))
    v = torch.randn(T, h, dv, generator=g)
    times = [torch.cumsum(torch.randint(0, 100_000, (n + 1,), generator=g), 0) for n in lengths]
    return dict(
        q=q, k=k, v=v, offsets=torch.tensor([0, *lengths]).cumsum(0),
        pos_w=torch.randn(max(lengths) + 3, generator=g) * 0.5 if pos else None,
        ts_w=torch.randn(NUM_BUCKETS + 1, generator=g) * 0.5 if ts else None,
        timestamps=torch.cat([t[:-1] for t in times]), query_times=torch.cat([t[1:] for t in times]),
        has_time=None if has_time is None else torch.tensor(has_time),
        norm=torch.tensor(lengths, dtype=torch.float32).clamp(min=1) if norm == "seq" else norm,
        dtype=getattr(torch, dtype), d_out=torch.randn(T, h, dv, generator=g),
    )  # fmt: skip


def outputs_and_grads(attention, inputs, dtype, **kw) -> dict[str, torch.Tensor | None]:
    """out and the gradients of q, k, v, pos_w, ts_w (None where there is none) for Σ out · d_out."""
    leaves = {name: inputs[name] for name in ("q", "k", "v", "pos_w", "ts_w")}
    leaves = {name: None if x is None else x.to(dtype if name in ("q", "k", "v") else torch.float32).clone()
              for name, x in leaves.items()}  # fmt: skip
    for x in leaves.values():
        if x is not None:
            x.requires_grad_()
    out = attention(leaves["q"], leaves["k"], leaves["v"], inputs["offsets"], leaves["pos_w"], leaves["ts_w"],
                    inputs["timestamps"], inputs["query_times"], inputs["has_time"], NUM_BUCKETS, inputs["norm"],
                    **kw)  # fmt: skip
    (out.float() * inputs["d_out"]).sum().backward()
    return {"out": out.detach()} | {name: None if x is None else x.grad for name, x in leaves.items()}


def run_case(spec: dict) -> dict:
    """Relative errors of the kernels against the reference (run in fp32 on the same, rounded, inputs)."""
    inputs = make_inputs(**spec)
    dtype = inputs["dtype"]
    rounded = {**inputs, **{name: inputs[name].to(dtype).float() for name in ("q", "k", "v")}}
    reference = outputs_and_grads(jagged_hstu_attention_reference, rounded, torch.float32)
    config = {} if spec["config"] is None else {"config": spec["config"]}
    start = time.perf_counter()
    kernel = outputs_and_grads(triton_jagged_hstu_attention, inputs, dtype, **config)
    errors = {}
    for name, ref in reference.items():
        got = kernel[name]
        if ref is None or got is None:
            errors[name] = None if ref is None and got is None else f"gradient: reference {ref is not None}, " \
                                                                   f"kernel {got is not None}"  # fmt: skip
            continue
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        errors[name] = float((got.float() - ref).abs().max()) / max(scale, 1e-12) if ref.numel() else 0.0
    return {"errors": errors, "out_dtype": str(kernel["out"].dtype), "seconds": time.perf_counter() - start}


@triton.jit
def _bucket_kernel(query_times, timestamps, thresholds, out, n, num_buckets, BLOCK: tl.constexpr,
                   LOG_BASE: tl.constexpr):  # fmt: skip
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    qt = tl.load(query_times + i, mask=i < n, other=0)
    t = tl.load(timestamps + i, mask=i < n, other=0)
    tl.store(out + i, triton_hstu._time_bucket(qt, t, thresholds, num_buckets, LOG_BASE), mask=i < n)


def bucket_mismatches() -> dict:
    """The kernels' bucket ids against ``time_buckets`` on gaps 0..4095, at every bucket threshold and one below,
    on large random gaps, in both directions (query time before or after the timestamp)."""
    thresholds = bucket_thresholds(NUM_BUCKETS, "cpu")
    finite = thresholds[1:-1][thresholds[1:-1] < torch.iinfo(torch.int64).max]
    g = torch.Generator().manual_seed(0)
    gaps = torch.cat([torch.arange(4096), finite, finite - 1, torch.randint(0, 2**50, (4096,), generator=g)])
    base = torch.randint(0, 2**40, gaps.shape, generator=g)
    qt = torch.cat([base + gaps, base])
    t = torch.cat([base, base + gaps])
    out = torch.empty(qt.shape, dtype=torch.int32)
    block = 1024
    _bucket_kernel[(triton.cdiv(len(qt), block),)](qt, t, thresholds, out, len(qt), NUM_BUCKETS, BLOCK=block,
                                                   LOG_BASE=LOG_BUCKET_BASE)  # fmt: skip
    reference = time_buckets(qt.view(-1, 1), t.view(-1, 1), NUM_BUCKETS).view(-1)
    return {"pairs": len(qt), "mismatches": int((out.long() != reference).sum()), "thresholds": len(finite)}


def encoder_errors() -> dict:
    """The path a CUDA device takes: the whole HSTU encoder on the flat jagged path with the Triton engine, against
    the blocked CPU engine and the padded path: max abs differences of the outputs and of the parameter gradients."""
    from genrec.ops.jagged import jagged_encode_batch
    from tests.ops import make_batch, make_model, max_diff, param_grads

    model = make_model(max_len=40, num_blocks=2, attention_dim=25, linear_dim=12)
    batch = make_batch(B=4, N=37, lengths=[37, 5, 20, 1], has_time=[True, False, True, True])
    w = torch.randn(4, 37, 8, generator=torch.Generator().manual_seed(1))
    outs = {"padded": model.encode(batch), "blocked": jagged_encode_batch(model, batch),
            "triton": jagged_encode_batch(model, batch, engine="triton")}  # fmt: skip
    grads = {name: param_grads(model, out, w) for name, out in outs.items()}
    result = {}
    for other in ("padded", "blocked"):
        result[f"out_vs_{other}"] = max_diff(outs["triton"], outs[other])
        result[f"grad_vs_{other}"] = max(max_diff(grads["triton"][n], grads[other][n]) for n in grads[other])
    return result


def interpreted_report() -> dict:
    """Every case under the interpreter (this process must have been started with TRITON_INTERPRET=1)."""
    report = {"interpreted": triton_hstu._INTERPRETED, "cases": {}}
    try:
        report["encoder"] = encoder_errors()
    except Exception:
        report["encoder"] = {"exception": traceback.format_exc()}
    for name, spec in CASES.items():
        try:
            report["cases"][name] = run_case(spec)
        except Exception:  # reported per case, so that one failure does not hide the others
            report["cases"][name] = {"exception": traceback.format_exc()}
    try:
        report["buckets"] = bucket_mismatches()
    except Exception:
        report["buckets"] = {"exception": traceback.format_exc()}
    return report


# ------------------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_child_process_runs_the_interpreter(report):
    assert report["interpreted"]


@pytest.mark.parametrize("name", CASES)
def test_outputs_and_gradients_equal_the_reference(report, name):
    result = report["cases"][name]
    assert "exception" not in result, result.get("exception")
    spec = CASES[name]
    tol = HALF_TOL if spec.get("dtype") == "float16" else FP32_TOL
    errors = result["errors"]
    assert not [e for e in errors.values() if isinstance(e, str)], errors
    assert all(e is None or e <= tol for e in errors.values()), errors
    # the gradient of each table exists exactly when its term is on (reference: ts_w unused when has_time is None)
    assert (errors["pos_w"] is not None) == spec["pos"]
    assert (errors["ts_w"] is not None) == (spec["ts"] and spec["has_time"] is not None)
    assert result["out_dtype"] == f"torch.{spec.get('dtype', 'float32')}"


def test_encoder_on_the_triton_engine_equals_the_cpu_engine_and_the_padded_path(report):
    result = report["encoder"]
    assert "exception" not in result, result.get("exception")
    assert all(v <= 1e-5 for v in result.values()), result


def test_bucket_ids_equal_time_buckets_bit_for_bit(report):
    result = report["buckets"]
    assert "exception" not in result, result.get("exception")
    assert result["thresholds"] > 100  # buckets 2..~145 have an int64 gap
    assert result["mismatches"] == 0, result


def test_bucket_thresholds_bound_each_bucket():
    thresholds = bucket_thresholds(NUM_BUCKETS, "cpu")
    inner = thresholds[1:-1]
    assert thresholds[0] == 0 and thresholds[-1] == torch.iinfo(torch.int64).max
    assert bool((inner[1:] >= inner[:-1]).all())
    finite = inner < torch.iinfo(torch.int64).max
    buckets = torch.arange(1, NUM_BUCKETS + 1)[finite]
    at, below = (time_buckets(g.view(-1, 1), torch.zeros(len(g), 1, dtype=torch.long), NUM_BUCKETS).view(-1)
                 for g in (inner[finite], inner[finite] - 1))  # fmt: skip
    assert bool((at >= buckets).all()) and bool((below < buckets).all())


def _inputs(**kw):
    inputs = make_inputs(**CASES["both_terms_per_sequence_norm"])
    return {name: x for name, x in inputs.items() if name not in ("dtype", "d_out")} | kw


def _call(inputs):
    return triton_jagged_hstu_attention(inputs["q"], inputs["k"], inputs["v"], inputs["offsets"], inputs["pos_w"],
                                        inputs["ts_w"], inputs["timestamps"], inputs["query_times"],
                                        inputs["has_time"], NUM_BUCKETS, inputs["norm"])  # fmt: skip


@pytest.mark.parametrize(("change", "match"), [
    (lambda x: {"offsets": x["offsets"][:-1]}, "offsets must rise from 0 to T"),
    (lambda x: {"offsets": x["offsets"] + 1}, "offsets must rise from 0 to T"),
    (lambda x: {"offsets": torch.tensor([0, 60, 50, len(x["q"])])}, "offsets must rise from 0 to T"),
    (lambda x: {"offsets": x["offsets"].float()}, "offsets must be a 1-d integer tensor"),
    (lambda x: {"v": x["v"][:-1]}, r"q, k must be \[T, h, dqk\]"),
    (lambda x: {"k": x["k"].double()}, "one dtype"),
    (lambda x: {"pos_w": x["pos_w"][:30]}, "pos_w must be 1-d with at least"),
    (lambda x: {"ts_w": x["ts_w"][:-1]}, r"ts_w must be \[num_buckets \+ 1\]"),
    (lambda x: {"timestamps": x["timestamps"][:-1]}, "timestamps and query_times must be"),
    (lambda x: {"has_time": x["has_time"][:-1]}, r"has_time must be \[B\]"),
    (lambda x: {"norm": torch.ones(2)}, r"norm must be a scalar or \[B\]"),
])  # fmt: skip
def test_bad_inputs_raise_clear_errors(change, match):
    inputs = _inputs()
    with pytest.raises(ValueError, match=match):
        _call({**inputs, **change(inputs)})


def test_cpu_tensors_need_the_interpreter():
    if triton_hstu._INTERPRETED:
        pytest.skip("this process runs under TRITON_INTERPRET=1, where CPU tensors are valid")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        _call(_inputs())


def test_without_triton_calls_say_so(monkeypatch):
    assert triton_hstu.available()
    monkeypatch.setattr(triton_hstu, "_IMPORT_ERROR", ImportError("No module named 'triton'"))
    assert not triton_hstu.available()
    with pytest.raises(RuntimeError, match="needs the triton package"):
        _call(_inputs())


def test_tile_sizes_are_checked():
    with pytest.raises(ValueError, match="power of two >= 16"):
        KernelConfig(block_m=24)
    with pytest.raises(ValueError, match="power of two >= 16"):
        KernelConfig(block_kv=8)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(interpreted_report()))
