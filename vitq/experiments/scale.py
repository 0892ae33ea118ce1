"""`vitq scale`: the default `vitq run` on real-size models, as a user runs it, with its peak memory and time.

Per model: a user's folder of its own (a labelled image folder at the model's input size, drawn from
scikit-learn's digits as RGB, 3 classes; the model's seeded random weights saved as a local checkpoint, as a
user's own fine-tuned checkpoint would be), then `vitq init <ws> --model <source> --checkpoint ... --data ...`
with the defaults (recipes, budgets, workers) and `vitq run` in it, each as its own process, as typed. Measured:
the run's wall seconds and its peak RSS, and that of its children (the kernel's, by wait4: the whole process tree
that was waited for), each stage's seconds and peak RSS from the run's record (reports/summary.json; the
console's stage lines for a run that did not finish), and whether it finished. A run over `--timeout` is killed and recorded as such; so is one the OOM killer ends.

Writes `--out` (JSON: machine, settings, one record per model and run) and `--markdown` (a table, with the
machine). SAM's image encoder (`samvit_base_patch16`, 1024x1024) runs as a dense task on its feature map.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("vitq.experiments.scale")

# (model source, vitq init --task, input size): the four (issue 30)
MODELS = {
    "torchvision:swin_t": ("classification", 224),
    "timm:vit_base_patch16_224": ("classification", 224),
    "timm:vit_large_patch16_224": ("classification", 224),
    "timm:samvit_base_patch16": ("dense", 1024),
}
CLASSES = 3
STAGE_LINE = re.compile(r"^(?P<stage>[\w@.-]+): (?:quantize \+ validate )?done in (?P<s>[\d.]+) s"
                        r"(?:, peak RSS (?P<mb>[\d,]+) MB(?: \(.+\))?)?$")


def user_folder(source: str, task: str, size: int, root: Path, images: int) -> list[str]:
    """Checkpoint and image folder of a user of `source`; returns the `vitq init` model/data options."""
    import timm
    import torch
    import torchvision
    from PIL import Image
    from sklearn.datasets import load_digits

    root.mkdir(parents=True, exist_ok=True)
    kind, name = source.split(":", 1)
    torch.manual_seed(0)
    if kind == "timm":
        model = timm.create_model(name, pretrained=False, **({} if task == "dense" else {"num_classes": CLASSES}))
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=CLASSES)
    checkpoint = root / f"{name}.pth"
    torch.save(model.state_dict(), checkpoint)
    del model
    digits = load_digits()
    rng = np.random.default_rng(0)
    splits = {"val": images, "calibration": max(images // 2, 8), "train": 4}
    for split, n in splits.items():
        for c in range(CLASSES):  # classification: class folders; dense: the images directly (no labels)
            folder = root / "images" / split / (f"class{c}" if task == "classification" else "")
            folder.mkdir(parents=True, exist_ok=True)
            pool = np.flatnonzero(digits.target == c)
            for i, k in enumerate(rng.choice(pool, n // CLASSES + 1)):
                pixels = (digits.images[k] / 16 * 255).astype(np.uint8)
                Image.fromarray(pixels).resize((size, size)).convert("RGB").save(folder / f"{c}-{i}.png")
    return ["--model", source, "--checkpoint", str(checkpoint), "--data", str(root / "images"), "--task", task]


def _wait4(proc: subprocess.Popen, timeout_s: float) -> tuple[int, float, bool]:
    """(exit status as subprocess gives it, peak RSS MB of the process (and what it waited for), timed out?)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024, False
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024, True
        time.sleep(0.5)


def run_once(source: str, root: Path, timeout_s: float, images: int) -> dict:
    """`vitq init` then the default `vitq run` for `source` under `root`; the record of the run."""
    task, size = MODELS.get(source, ("classification", 224))
    started = time.perf_counter()
    opts = user_folder(source, task, size, root / "user", images)
    ws = root / "ws"
    vitq = [sys.executable, "-m", "vitq.cli"]
    init = subprocess.run([*vitq, "init", str(ws), *opts], capture_output=True, text=True)
    record: dict = {"model": source, "task": task, "input": size, "init_s": round(time.perf_counter() - started, 1)}
    if init.returncode != 0:
        return {**record, "status": "failed", "stage": "init", "cause": (init.stderr or init.stdout).strip()[-500:]}
    console = root / "console.txt"
    with open(console, "w") as out:
        t = time.perf_counter()
        proc = subprocess.Popen([*vitq, "run"], cwd=ws, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        code, peak_mb, timed_out = _wait4(proc, timeout_s)
        wall = time.perf_counter() - t
    lines = console.read_text(errors="replace").splitlines()
    stages = recorded_stages(ws)
    for line in lines if not stages else []:  # a run that did not finish: what its console said
        m = STAGE_LINE.match(line.strip())
        if m:
            stages[m["stage"]] = {"seconds": float(m["s"]),
                                  "peak_rss_mb": float(m["mb"].replace(",", "")) if m["mb"] else None}
    status = "ok" if code == 0 else "timed out" if timed_out else \
        "killed (OOM killer or kill -9)" if code == -signal.SIGKILL else f"failed (exit {code})"
    record.update(status=status, run_s=round(wall, 1), peak_rss_mb=round(peak_mb), stages=stages,
                  last_lines=[] if code == 0 else lines[-5:])
    return record


def recorded_stages(ws: Path) -> dict:
    """Each DVC stage's seconds and peak RSS from the run's own record (reports/summary.json), or {}."""
    summary = ws / "reports" / "summary.json"
    if not summary.is_file():
        return {}
    return {r["stage"]: {"seconds": r["seconds"], "peak_rss_mb": r.get("peak_rss_mb")}
            for r in json.loads(summary.read_text()).get("stages") or []}


def run_scale(models: list[str], runs: int, root: Path, out: Path, timeout_s: float, images: int) -> dict:
    from vitq.tasks._io import write_json
    from vitq.tasks.benchmark import machine_info

    result = {"machine": machine_info(), "settings": {"runs": runs, "timeout_s": timeout_s, "images": images},
              "runs": []}
    for source in models:
        for i in range(runs):
            log.info("scale: %s run %d/%d", source, i + 1, runs)
            folder = root / f"{source.replace(':', '_')}-{i}"
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            rec = {"run": i + 1, **run_once(source, folder, timeout_s, images)}
            result["runs"].append(rec)
            print(f"[{source} {i + 1}/{runs}] {rec['status']}: {rec.get('run_s', 0):.0f} s, peak RSS "
                  f"{rec.get('peak_rss_mb', 0):,} MB", flush=True)
            write_json(out, result)
    return result


def markdown(result: dict) -> str:
    m = result["machine"]
    rows = ["# The default `vitq run` at real sizes (`vitq scale`)", "",
            f"Written by `vitq scale` (vitq/experiments/scale.py). Machine: {m.get('cpu')}, {m.get('cores')} cores, "
            f"{m.get('system')}. Peak RSS: the kernel's for `vitq run` and what it waited for; per stage: the run "
            "process's own while the stage ran (the run's record: reports/summary.json).", "",
            "| model | task | input | run | status | wall s | peak RSS MB | slowest stages (s, peak MB) |",
            "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        slow = sorted(r.get("stages", {}).items(), key=lambda kv: -kv[1]["seconds"])[:4]
        text = "; ".join(f"{k} {v['seconds']:.0f}" + (f" ({v['peak_rss_mb']:,.0f})" if v["peak_rss_mb"] else "")
                         for k, v in slow)
        peak = f"{r['peak_rss_mb']:,}" if r.get("peak_rss_mb") is not None else "–"  # none: init failed
        rows.append(f"| `{r['model']}` | {r['task']} | {r['input']} | {r['run']} | {r['status']} | "
                    f"{r.get('run_s', '–')} | {peak} | {text} |")
    return "\n".join(rows) + "\n"


def main(models: str | None, runs: int, workdir: Path, out: Path, md: Path | None, timeout_s: float,
         images: int) -> dict:
    from vitq.errors import VitqError

    chosen = [s.strip() for s in models.split(",")] if models else list(MODELS)
    for s in chosen:
        if not s.startswith(("timm:", "torchvision:")):
            raise VitqError(f"--models {s!r}: a model is 'timm:<name>' or 'torchvision:<name>'; "
                            f"the default list: {', '.join(MODELS)}")
    if runs < 1 or timeout_s <= 0 or images < CLASSES:
        raise VitqError(f"--runs {runs} (>= 1), --timeout {timeout_s} (> 0) and --images {images} (>= {CLASSES})")
    result = run_scale(chosen, runs, workdir, out, timeout_s, images)
    if md is not None:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(markdown(result))
    print(json.dumps([{k: r.get(k) for k in ("model", "run", "status", "run_s", "peak_rss_mb")} for r in result["runs"]],
                     indent=1))
    return result
