"""The paper's ablation (Table 5 of Rai et al., ICCV 2023) re-run on SynthRoad with the project's own commands.

Rows, each scored with the mask-level score ``1 - max_c S_c(x)`` ("MSP on masks"):

A. Mask2Former (global masked attention off), stage 1
B. + global masked attention (stage 1)
C. + mask contrastive loss with outlier exposure (stage 2 from B)
D. + mask refinement
E. + flip test-time augmentation

Missing runs are trained with ``mask2anomaly-train`` (stage 1 twice, with and without GMA, each as the config's
recipe has it: one command, or two when the config sets ``stage1_continuation``; then stage 2 from the GMA run), the SynthRoad test splits are generated with ``mask2anomaly-synthroad``, every row is evaluated with
``mask2anomaly-eval`` on both splits, and the markdown table is printed and written next to the runs::

    python -m mask2anomaly_eval.ablation --config synthroad --output-dir outputs/ablation

Existing run folders are reused (``--gma-stage1``/``--nogma-stage1``/``--gma-stage2`` point at other ones). Before
anything is evaluated, each run's own record is checked against what its rows claim (`check_runs`): the run of
row A must have global masked attention off in its config.json, the others on; rows A and B must come from a
stage-1 run and C-E from a stage-2 run (``stage`` in its training_config.yaml). A mismatch is refused with one
line naming the folder, the setting found and the one expected, so that no table mislabels a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROWS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("A. Mask2Former, 1 - max_c S_c (MSP on masks)", "nogma_stage1", ("--no-refine", "--no-flip")),
    ("B. + global masked attention", "gma_stage1", ("--no-refine", "--no-flip")),
    ("C. + mask contrastive loss, outlier exposure", "gma_stage2", ("--no-refine", "--no-flip")),
    ("D. + mask refinement", "gma_stage2", ("--no-flip",)),
    ("E. + flip test-time augmentation", "gma_stage2", ()),
)
SPLITS = ("anomaly", "obstacle")

# What each run of ROWS must be: (global masked attention, training stage).
RUN_REQUIREMENTS: dict[str, tuple[bool, int]] = {
    "nogma_stage1": (False, 1),
    "gma_stage1": (True, 1),
    "gma_stage2": (True, 2),
}


def _run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def stage1_continuation(config: str) -> list[str]:
    """The overrides of the config's second stage-1 command (`stage1_continuation`; empty: none), checked against
    the config as the training will apply them, so that a wrong key is refused before the first part trains."""
    from mask2anomaly_training.config import is_override, load_config  # only here: --help needs nothing heavy

    overrides = list(load_config(config).stage1_continuation)
    for override in overrides:
        if not is_override(override):
            raise ValueError(f"config {config!r}: stage1_continuation entry {override!r} is not a key=value override")
    try:
        load_config(config, overrides)
    except ValueError as err:
        raise ValueError(f"config {config!r}: stage1_continuation: {err}") from None
    return overrides


def train_missing(config: str, runs: dict[str, Path]) -> None:
    """Train the three runs that do not exist yet (a folder with config.json counts as done), each stage 1 as
    the config's recipe has it: one command, or two when it sets `stage1_continuation` (the first writes
    `<run>-part1`, the second continues from it into the run's folder)."""
    continuation = stage1_continuation(config)
    train = [_bin("mask2anomaly-train"), "--config", config]
    for key, extra in (("nogma_stage1", ["model.config.global_masked_attention=false"]), ("gma_stage1", [])):
        if (runs[key] / "config.json").exists():
            continue
        init_from = []
        if continuation:
            first = runs[key].with_name(runs[key].name + "-part1")
            if not (first / "config.json").exists():
                _run([*train, "--output-dir", str(first), "--stage", "1", *extra])
            init_from = ["--init-from", str(first)]
        _run([*train, "--output-dir", str(runs[key]), "--stage", "1", *init_from, *extra, *continuation])
    if not (runs["gma_stage2"] / "config.json").exists():
        _run([*train, "--output-dir", str(runs["gma_stage2"]), "--stage", "2", "--init-from", str(runs["gma_stage1"])])


def check_run(key: str, folder: Path) -> None:
    """Refuse (ValueError, one line) a run folder whose config.json / training_config.yaml do not match `key`'s
    requirement in `RUN_REQUIREMENTS`: the GMA setting and the training stage its rows are labelled with."""
    import yaml  # only here: the driver's --help needs nothing heavy

    gma, stage = RUN_REQUIREMENTS[key]
    rows = ", ".join(name.split(".")[0] for name, run, _ in ROWS if run == key)
    config_path, record_path = folder / "config.json", folder / "training_config.yaml"
    for path in (config_path, record_path):
        if not path.is_file():
            raise ValueError(f"{path} not found: cannot check that the run for row(s) {rows} has "
                             f"global_masked_attention={str(gma).lower()} and stage {stage}")
    try:
        config = json.loads(config_path.read_text())
        record = yaml.safe_load(record_path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read the run record of row(s) {rows} in {folder}: {err}") from err
    found_gma = config.get("global_masked_attention") if isinstance(config, dict) else None
    if found_gma is not gma:
        raise ValueError(f"{config_path}: global_masked_attention={json.dumps(found_gma)}, but row(s) {rows} need "
                         f"a run with global_masked_attention={str(gma).lower()}")
    found_stage = record.get("stage") if isinstance(record, dict) else None
    if found_stage != stage:
        raise ValueError(f"{record_path}: stage {found_stage!r}, but row(s) {rows} need a stage-{stage} run")


def check_runs(runs: dict[str, Path], existing_only: bool = False) -> None:
    """`check_run` for every run of the table (with `existing_only`, for those already trained: a run given by a
    flag is checked before hours go into training the others)."""
    for key in RUN_REQUIREMENTS:
        if not existing_only or (runs[key] / "config.json").exists():
            check_run(key, runs[key])


def make_test_splits(data_dir: Path, num: int, seed: int) -> dict[str, Path]:
    splits = {}
    for split in SPLITS:
        folder = data_dir / split
        if not (folder / "images").is_dir() or len(list((folder / "images").glob("*.png"))) < num:
            _run([_bin("mask2anomaly-synthroad"), "--split", split, "--num", str(num), "--seed", str(seed),
                  "--output-dir", str(folder), "--height", "128", "--width", "256"])
        splits[split] = folder
    return splits


def evaluate_rows(runs: dict[str, Path], splits: dict[str, Path], results_dir: Path) -> list[dict]:
    rows = []
    for index, (name, run, flags) in enumerate(ROWS):
        row = {"row": name, "model": str(runs[run]), "flags": list(flags)}
        for split, folder in splits.items():
            out = results_dir / f"row{index}_{split}"
            _run([_bin("mask2anomaly-eval"), "--model", str(runs[run]), "--benchmark", "synthroad",
                  "--data-dir", str(folder), "--output-dir", str(out), "--scorer", "mask2anomaly", *flags])
            metrics = json.loads((out / f"synthroad-{split}.json").read_text())["metrics"]
            row[split] = {key: metrics[key] for key in ("auprc", "fpr95", "auroc")}
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| variant | anomaly AuPRC | anomaly FPR95 | obstacle AuPRC | obstacle FPR95 |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        a, o = row["anomaly"], row["obstacle"]
        lines.append(f"| {row['row']} | {100 * a['auprc']:.1f} | {100 * a['fpr95']:.1f} | "
                     f"{100 * o['auprc']:.1f} | {100 * o['fpr95']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="synthroad", help="training config for the three runs")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/ablation"))
    parser.add_argument("--gma-stage1", type=Path, help="existing stage-1 run with GMA (default OUTPUT/gma-stage1)")
    parser.add_argument("--nogma-stage1", type=Path, help="existing stage-1 run without GMA")
    parser.add_argument("--gma-stage2", type=Path, help="existing stage-2 run (from the GMA stage 1)")
    parser.add_argument("--num-test-images", type=int, default=100)
    parser.add_argument("--test-seed", type=int, default=3)
    args = parser.parse_args(argv)

    out = args.output_dir
    runs = {
        "gma_stage1": args.gma_stage1 or out / "gma-stage1",
        "nogma_stage1": args.nogma_stage1 or out / "nogma-stage1",
        "gma_stage2": args.gma_stage2 or out / "gma-stage2",
    }
    try:
        check_runs(runs, existing_only=True)
        train_missing(args.config, runs)
        check_runs(runs)
    except (ValueError, FileNotFoundError) as err:
        print(f"ablation: {err}", file=sys.stderr)
        return 2
    splits = make_test_splits(out / "data", args.num_test_images, args.test_seed)
    rows = evaluate_rows(runs, splits, out / "results")
    table = markdown_table(rows)
    (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    (out / "ablation.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
