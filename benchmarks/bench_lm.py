"""A small causal LM, trained here, pruned by progprune to 1.5x and 2x params, fine-tuned; and
fine-tuning throughput through Ray Train vs a plain loop. One run, one table each.

1. Base: the Python documentation topics (`pydoc_data.topics`, ships with Python) written as
   train/val/test .txt (90/5/5 by characters); a byte-level BPE tokenizer trained on train
   (`progprune.lm.text.train_tokenizer`); a Llama of a few million parameters (grouped-query
   attention) trained with progprune's own `fit` (AdamW, linear warm-up, cosine, per step);
   its test perplexity is printed beside the unigram baseline (add-one smoothed train
   counts). Saved with save_pretrained + its tokenizer: the `hf:` base of the rest.
2. Prune: `progprune prune hf:BASE --dataset text ... --json` through the real click group
   in this process, per (method, target): params targets, dims heads+mlp, then one epoch of
   AdamW fine-tuning over a fixed slice of train (the same budget for every row; val and
   test are the base's files). The row's figures: perplexity base / pruned / fine-tuned,
   next-token top-1, params, MACs per token, prune and fine-tune seconds.
3. Ray Train vs plain: `progprune sweep` of one combination (l2, 2x, finetune.num_workers 1,
   resources.cpus_per_task = --threads) on an embedded local Ray, in a process of its own
   whose output lines are timestamped as they arrive; then `progprune.training.fit` in this
   process on the sweep's own pruned.pt, same data, same FinetuneConfig. tokens/s =
   tokens trained / fit's seconds (the row's finetune_seconds on the Ray side: fit inside
   the Train worker, its DDP wrapper and per-epoch report + checkpoint included; fit's
   seconds include each epoch's validation, on both sides). Start-up = from the prune
   task's last line (the pruned test figures) to the worker's first ("fine-tuning for"):
   the Train worker group, its process, data and artifact loading.

Every training and evaluation runs with --threads torch threads (1 by default: the dev
machine has 2 cores shared with other work; the load average is printed at start and end).

    python benchmarks/bench_lm.py            # 11 minutes on the shared 2-core dev machine
    python benchmarks/bench_lm.py --quick    # tiny sizes, about 2 minutes: does it work
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import cpu_name

ROOT = Path(__file__).resolve().parents[1]

# model, data and budgets: the full run and --quick
FULL = dict(layers=4, hidden=256, heads=8, kv_heads=4, mlp=704, vocab=2048, seq_len=128, batch=16,
            corpus_chars=None, base_epochs=5, base_lr=3e-3, ft_fraction=0.5, ft_lr=1e-3, steps=8,
            methods=("l2", "taylor", "random"), targets=(1.5, 2.0), ray_target=2.0)
QUICK = dict(layers=2, hidden=64, heads=4, kv_heads=2, mlp=176, vocab=512, seq_len=64, batch=16,
             corpus_chars=120_000, base_epochs=2, base_lr=3e-3, ft_fraction=0.25, ft_lr=1e-3, steps=4,
             methods=("l2", "taylor"), targets=(1.5, 2.0), ray_target=2.0)


def load() -> float:
    return os.getloadavg()[0]


# ---- 1. the corpus, the tokenizer, the base model ---------------------------------------
def write_corpus(root: Path, chars: int | None, ft_fraction: float) -> tuple[Path, Path]:
    """`root/text` (train/val/test, 90/5/5 by characters) and `root/text-ft`: the first
    `ft_fraction` of train as its train, the same val and test (the fine-tune budget)."""
    from pydoc_data.topics import topics

    corpus = "\n\n".join(topics[k] for k in sorted(topics))[:chars]
    cut1, cut2 = int(len(corpus) * 0.90), int(len(corpus) * 0.95)
    parts = {"train": corpus[:cut1], "val": corpus[cut1:cut2], "test": corpus[cut2:]}
    full, ft = root / "text", root / "text-ft"
    for d in (full, ft):
        d.mkdir(parents=True)
    for name, part in parts.items():
        (full / f"{name}.txt").write_text(part, encoding="utf-8")
        ft_part = part[:int(len(part) * ft_fraction)] if name == "train" else part
        (ft / f"{name}.txt").write_text(ft_part, encoding="utf-8")
    return full, ft


def unigram_perplexity(data) -> float:
    """exp of the cross-entropy of add-one smoothed train token frequencies on exactly the
    test targets the model's perplexity is measured on (each block's next tokens)."""
    import numpy as np

    vocab = data.num_classes
    counts = np.bincount(np.asarray(data.tokens("train"), dtype=np.int64), minlength=vocab) + 1.0
    logp = np.log(counts / counts.sum())
    targets = np.asarray(data.tokens("test")[1:data.size("test") * data.seq_len + 1], dtype=np.int64)
    return float(math.exp(-logp[targets].mean()))


def train_base(root: Path, s: dict, threads: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from progprune.config import DatasetConfig, TrainConfig
    from progprune.data.text import load_text
    from progprune.lm.text import train_tokenizer
    from progprune.tasks.causal_lm import perplexity_of
    from progprune.training import evaluate_metrics, fit

    full, ft = write_corpus(root, s["corpus_chars"], s["ft_fraction"])
    t0 = time.perf_counter()
    tok = train_tokenizer([full / "train.txt"], vocab_size=s["vocab"])
    tok_s = time.perf_counter() - t0
    data = load_text(DatasetConfig(name="text", data_dir=str(full), seq_len=s["seq_len"], eval_batch_size=64),
                     tok, cache_dir=str(root / "cache"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      intermediate_size=s["mlp"], max_position_embeddings=s["seq_len"],
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                      use_cache=False)
    model = LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    train = TrainConfig(epochs=s["base_epochs"], lr=s["base_lr"], weight_decay=0.01, batch_size=s["batch"],
                        optimizer="adamw", warmup=0.05, schedule="cosine")
    dev = torch.device("cpu")
    before = perplexity_of(evaluate_metrics(model, data, "test", dev)["nll"])
    res = fit(model, data, train, dev, seed=0, stage="base training",
              on_epoch=lambda m, _s: print(f"  base epoch {m['epoch'] + 1}/{train.epochs}: train loss "
                                           f"{m['loss']:.3f} (perplexity {perplexity_of(m['loss']):.1f}), "
                                           f"val top-1 {m['val_top1']:.4f}, load {load():.1f}", flush=True))
    m = evaluate_metrics(model, data, "test", dev)
    base = root / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    steps = train.epochs * (data.size("train") // train.batch_size)
    return {"dir": base, "full": full, "ft": ft, "params": params, "vocab": len(tok),
            "tokens": {k: data.counts[k] for k in ("train", "val", "test")},
            "ft_train_chars": (ft / "train.txt").stat().st_size,
            "tokenizer_s": tok_s, "fit_s": res.seconds, "steps": steps,
            "tokens_trained": steps * train.batch_size * s["seq_len"], "ppl_init": before,
            "ppl": perplexity_of(m["nll"]), "top1": m["top1"], "unigram": unigram_perplexity(data)}


# ---- 2. prune + fine-tune through the CLI -------------------------------------------------
def cli_flags(base: dict, s: dict, method: str, target: float) -> list[str]:
    return ["--model", f"hf:{base['dir']}", "--speedup", f"{target:g}", "--method", method,
            "--dataset", "text", "--data-dir", str(base["ft"]), "--seq-len", str(s["seq_len"]),
            "--target-metric", "params", "--dims", "heads,mlp", "--iterative-steps", str(s["steps"]),
            "--finetune-epochs", "1", "--optimizer", "adamw", "--finetune-lr", f"{s['ft_lr']:g}",
            "--warmup", "0.1", "--batch-size", str(s["batch"]), "--eval-batch-size", "64", "--device", "cpu"]


def prune_in_process(base: dict, s: dict, method: str, target: float, out: Path) -> dict:
    """`progprune prune ... --json` through the real click group; the row."""
    from click.testing import CliRunner

    from progprune.cli import main

    args = ["prune", *cli_flags(base, s, method, target), "--output", str(out), "--json"]
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    wall = time.perf_counter() - t0
    if r.exit_code != 0:
        raise SystemExit(f"progprune {' '.join(args)} exited {r.exit_code}:\n{r.stderr}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row["wall"] = wall
    return row


# ---- 3. Ray Train vs a plain loop -----------------------------------------------------------
def run_sweep(base: dict, s: dict, root: Path, threads: int) -> dict:
    """`progprune sweep` of one combination on an embedded local Ray, in its own process;
    its output lines stamped as they arrive. The row, the stamped lines, the wall time."""
    import yaml

    spec = {"name": "bench-lm-ray", "task": "causal_lm", "models": [f"hf:{base['dir']}"],
            "speedups": [s["ray_target"]], "methods": ["l2"],
            "dataset": {"name": "text", "data_dir": str(base["ft"]), "seq_len": s["seq_len"],
                        "eval_batch_size": 64},
            "pruning": {"target_metric": "params", "iterative_steps": s["steps"], "dims": ["heads", "mlp"]},
            "finetune": {"epochs": 1, "batch_size": s["batch"], "lr": s["ft_lr"], "optimizer": "adamw",
                         "warmup": 0.1, "num_workers": 1},
            "resources": {"cpus_per_task": threads},
            "output": str(root / "sweep")}
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "progprune", "sweep", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=root)

    def read():
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rc = proc.wait()
    reader.join()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"progprune sweep exited {rc}:\n" + "\n".join(x for _, x in lines[-40:]))
    import pyarrow.parquet as pq

    rows = pq.read_table(root / "sweep" / "results.parquet").to_pylist()
    if len(rows) != 1 or rows[0]["status"] != "ok":
        raise SystemExit(f"the sweep's rows are not one ok row: {rows}")
    return {"row": rows[0], "lines": lines, "wall": wall}


def stamp_of(lines, words: str, last: bool = False) -> float | None:
    hits = [t for t, x in lines if words in x]
    return (hits[-1] if last else hits[0]) if hits else None


def plain_fit(root: Path, row: dict, threads: int) -> dict:
    """fit() in this process on the sweep's own pruned.pt, with the combination's config."""
    import torch

    from progprune.config import ComboConfig
    from progprune.data.text import load_text
    from progprune.lm.artifact import load_lm
    from progprune.training import fit

    cfg = ComboConfig.model_validate_json(row["config_json"])
    t0 = time.perf_counter()
    model, tok, _ = load_lm(root / "sweep" / "combos" / row["combo_id"] / "pruned.pt")
    model.config.use_cache = False
    data = load_text(cfg.dataset, tok, cache_dir=str(root / "cache"))
    loaded = time.perf_counter() - t0
    res = fit(model, data, cfg.finetune, torch.device("cpu"), seed=cfg.seed, stage="fine-tune")
    steps = cfg.finetune.epochs * (data.size("train") // cfg.finetune.batch_size)
    return {"seconds": res.seconds, "steps": steps, "tokens": steps * cfg.finetune.batch_size * data.seq_len,
            "params": sum(p.numel() for p in model.parameters()), "load_s": loaded}


# ---- the run ---------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (about 2 minutes): does it work")
    ap.add_argument("--threads", type=int, default=1, help="torch threads here, CPUs of the Train worker")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR (kept) instead of a temporary folder")
    ap.add_argument("--no-ray", action="store_true", help="skip part 3")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else FULL

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    t_start, load_start = time.perf_counter(), load()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-lm-"))
    if args.keep and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["PROGPRUNE_CACHE"] = str(work / "cache")  # the token cache: nothing outside `work`
    try:
        print(f"setup: {cpu_name()}, {os.cpu_count()} cores, CPU only, {args.threads} torch thread(s); python "
              f"{platform.python_version()}, torch {torch.__version__}, transformers {md.version('transformers')}, "
              f"ray {md.version('ray')}; {'--quick' if args.quick else 'full'} sizes; load average at start "
              f"{load_start:.2f}", flush=True)

        # 1
        print("1. base model", flush=True)
        b = train_base(work, s, args.threads)
        print(f"corpus: pydoc_data.topics, tokens train/val/test {b['tokens']['train']:,}/{b['tokens']['val']:,}/"
              f"{b['tokens']['test']:,} (BPE vocab {b['vocab']}, trained in {b['tokenizer_s']:.1f}s)")
        print(f"model: Llama {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads on {s['kv_heads']} KV "
              f"heads, MLP {s['mlp']}, tied embeddings, seq_len {s['seq_len']}: {b['params']:,} params")
        print(f"base training: fit, adamw lr {s['base_lr']:g} (warm-up 5%, cosine, per step), batch {s['batch']}, "
              f"{s['base_epochs']} epochs = {b['steps']} steps, {b['tokens_trained']:,} tokens in {b['fit_s']:.0f}s "
              f"({b['tokens_trained'] / b['fit_s']:,.0f} tokens/s)")
        print(f"test perplexity: {b['ppl']:.2f} (unigram baseline {b['unigram']:.2f}, untrained {b['ppl_init']:.0f}); "
              f"next-token top-1 {b['top1']:.4f}", flush=True)

        # 2
        print(f"2. prune (progprune prune --json, in process) to params targets, dims heads+mlp, {s['steps']} steps; "
              f"fine-tune 1 epoch adamw lr {s['ft_lr']:g} on the first {s['ft_fraction']:.0%} of train "
              f"({b['ft_train_chars']:,} characters)", flush=True)
        rows = []
        for method in s["methods"]:
            for target in s["targets"]:
                row = prune_in_process(b, s, method, target, work / "prune" / f"{method}-{target:g}")
                rows.append(row)
                print(f"  {method} {target:g}x: {row['wall']:.0f}s in all, load {load():.1f}", flush=True)
        print(f"base: {rows[0]['base_params']:,} params, test perplexity {rows[0]['base_perplexity']:.2f}, "
              f"top-1 {rows[0]['base_top1']:.4f}")
        head = (f"{'method':<7} | {'target':>6} | {'params':>9} | {'achieved':>8} | {'MACs/tok x':>10} | "
                f"{'ppl base':>8} | {'pruned':>9} | {'fine-tuned':>10} | {'top-1 pruned':>12} | {'top-1 ft':>8} | "
                f"{'prune s':>7} | {'ft s':>6}")
        print(head)
        print("-" * len(head))
        for r in rows:
            print(f"{r['method']:<7} | {r['target_speedup']:>6g} | {r['pruned_params']:>9,} | "
                  f"{r['achieved_speedup']:>8.4f} | {r['macs_speedup']:>10.3f} | {r['base_perplexity']:>8.2f} | "
                  f"{r['pruned_perplexity']:>9.2f} | {r['final_perplexity']:>10.2f} | {r['pruned_top1']:>12.4f} | "
                  f"{r['final_top1']:>8.4f} | {r['prune_seconds']:>7.2f} | {r['finetune_seconds']:>6.1f}")

        # 3
        if not args.no_ray:
            print(f"3. fine-tuning throughput: Ray Train (progprune sweep, embedded local Ray, 1 worker, "
                  f"{args.threads} CPU) vs fit() in this process; l2 {s['ray_target']:g}x, 1 epoch", flush=True)
            sw = run_sweep(b, s, work, args.threads)
            row = sw["row"]
            plain = plain_fit(work, row, args.threads)
            t_pruned = stamp_of(sw["lines"], "] ok: ")  # the prune task's last line
            t_ft = stamp_of(sw["lines"], "] fine-tuning for")  # the Train worker's first
            t_epoch = stamp_of(sw["lines"], "] finetune epoch", last=True)  # its last
            t_row = stamp_of(sw["lines"], "combinations finished")
            ray_tps, plain_tps = plain["tokens"] / row["finetune_seconds"], plain["tokens"] / plain["seconds"]
            print(f"pruned model: {row['pruned_params']:,} params ({row['achieved_speedup']:.3f}x); "
                  f"{plain['steps']} steps x {s['batch']} x {s['seq_len']} = {plain['tokens']:,} tokens")
            print(f"{'loop':<10} | {'fit s':>6} | {'tokens/s':>8} | {'s/step':>6} | {'vs plain':>8}")
            print(f"{'plain':<10} | {plain['seconds']:>6.2f} | {plain_tps:>8,.0f} | "
                  f"{plain['seconds'] / plain['steps']:>6.3f} | {1:>8.3f}")
            print(f"{'Ray Train':<10} | {row['finetune_seconds']:>6.2f} | {ray_tps:>8,.0f} | "
                  f"{row['finetune_seconds'] / plain['steps']:>6.3f} | {ray_tps / plain_tps:>8.3f}")
            if None not in (t_pruned, t_ft, t_epoch, t_row):
                print(f"Ray Train fixed cost: start-up {t_ft - t_pruned:.1f}s (the prune task's last line to the "
                      f"Train worker's first: pruned test figures + pruned.pt, the fine-tune task, the worker "
                      f"group, data + artifact loading; plain: loading {plain['load_s']:.1f}s), tear-down "
                      f"{t_row - t_epoch:.1f}s (its last epoch line to the row: test figures, final.pt as a "
                      f"checkpoint, into the store, the row); whole sweep {sw['wall']:.1f}s (embedded Ray start "
                      f"to report)")
            (work / "sweep.log").write_text("".join(f"{t:8.2f} {x}\n" for t, x in sw["lines"]))
        print(f"total {time.perf_counter() - t_start:.0f}s; load average at start {load_start:.2f}, at end "
              f"{load():.2f} (2 cores: above 2 means other work shared them)", flush=True)
        return {"base": b, "rows": rows}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
