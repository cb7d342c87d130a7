"""The benchmark scripts run, and the FLOP count behind the "fraction of matrix throughput" figure is right."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Mask2FormerForUniversalSegmentation

from modeling_mask2anomaly import Mask2AnomalyConfig, Mask2AnomalyForUniversalSegmentation
from modeling_mask2anomaly.modeling_mask2anomaly import mask2former_config_from_mask2anomaly

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_model():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_model as module
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def background_attention_flops(config: Mask2AnomalyConfig, height: int, width: int) -> int:
    """FLOPs of the background cross-attentions, by hand: per decoder layer, the query and output projections
    (Q x d x d each), key and value projections (HW x d x d each) and the two attention products (Q x HW x d each),
    2 FLOPs per multiply-add; layer l attends to the feature level l mod 3 (strides 32, 16, 8)."""
    d, queries = config.hidden_dim, config.num_queries
    levels = [(height // stride) * (width // stride) for stride in (32, 16, 8)]
    total = 0
    for layer in range(config.decoder_layers - 1):
        hw = levels[layer % len(levels)]
        total += 2 * (2 * queries * d * d + 2 * hw * d * d + 2 * queries * hw * d)
    return total


def test_flop_count_difference_is_the_background_attention(bench_model):
    config = Mask2AnomalyConfig.tiny()
    torch.manual_seed(0)
    ours = Mask2AnomalyForUniversalSegmentation(config).eval()
    stock = Mask2FormerForUniversalSegmentation(mask2former_config_from_mask2anomaly(config)).eval()
    pixel_values = torch.randn(1, 3, 128, 256)
    ours_flops = bench_model.forward_flops(ours, pixel_values, None)
    stock_flops = bench_model.forward_flops(stock, pixel_values, None)
    assert stock_flops > 0
    assert ours_flops - stock_flops == background_attention_flops(config, 128, 256)


def test_bench_model_runs_and_prints_the_table():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_model.py"), "--configs", "tiny", "--height", "64", "--width", "128",
         "--repeats", "1"], capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("| tiny |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    stock = Mask2FormerForUniversalSegmentation(mask2former_config_from_mask2anomaly(Mask2AnomalyConfig.tiny()))
    assert cells[1] == f"{sum(p.numel() for p in stock.parameters()):,}"
    assert float(cells[5]) > 0  # ratio
    assert "%" in cells[8]  # fraction of the measured matmul peak


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without CUDA")
@pytest.mark.parametrize("script", ["bench_model.py", "bench_postprocess.py", "bench_predict.py"])
def test_cuda_without_a_gpu_is_a_clear_error(script, capsys):
    """`--device cuda` stops at argument parsing with argparse's one-line error (exit 2), before any model is built;
    run in this process (a subprocess per script would only add the imports)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{script[:-3]}", BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as stopped:
        module.main(["--device", "cuda"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "CUDA" in err and ": error: --device 'cuda'" in err.strip().splitlines()[-1]
