"""Stopping on the readout against stopping on the residual (issue 32, part 2): f evaluations
and agreement of the predictions, on the default image recipe's test split (`deqctl eval`)
and per token on the Shakespeare model's generation (`deqctl generate`, greedy).

    python bench/readout_stop.py --train --out bench-runs    # trains both briefly first
    python bench/readout_stop.py --mnist RUN --lm RUN         # trained runs given

Target: at most 0.7x the f evaluations of the residual stop at >= 99.5% agreement. Printed
per rule: NFE ratio readout / residual per sample (what each sample took until it stopped)
and per batch (what the solve spent: a batch runs until its last sample stops), and the
agreement (eval: the same class; generate: the same most likely next token, on the same
context and from the same start). Ratios only: timings on a shared machine mean little.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deqctl.engine.evaluate import evaluate                     # noqa: E402
from deqctl.inspect import open_source                          # noqa: E402
from deqctl.predict.generate import Generator, Sampler          # noqa: E402
from deqctl.solvers import ReadoutStop                           # noqa: E402

RULES = [ReadoutStop("kl", kl_tol=t) for t in (1e-3, 1e-4, 1e-5, 1e-6)] + \
        [ReadoutStop("argmax", patience=p) for p in (2, 4, 8)]
PROMPT = ("HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the "
          "mind to suffer\nThe slings and arrows of outrageous fortune,\nOr to take arms "
          "against a sea of troubles\nAnd by opposing end them.\n\nOPHELIA:\n")
TRAIN = {"mnist": ["configs/mnist-deq.yaml", "train.epochs=2"],
         "lm": ["configs/shakespeare-deq.yaml", "train.max_steps=300"]}


def train(name: str, out: Path) -> Path:
    """A short run of the recipe (as TRAIN says), or the run already there."""
    run = out / name
    if not (run / "recipe.yaml").exists():
        subprocess.run([sys.executable, "-m", "deqctl", "train", *TRAIN[name], "--out",
                        str(run), "--plain"], check=True, cwd=ROOT)
    return run


def eval_rows(run: Path) -> list[tuple[str, dict]]:
    """Per rule, eval's `readout` report on the test split."""
    src = open_source(str(run), [])
    data = src.split("test")
    rows = []
    for rule in RULES:
        src.model.deq.readout_stop = rule
        with src.model.auditing_readout(src.task.agree) as audit:
            evaluate(src.model, src.task, data, src.recipe.data.eval_batch_size,
                     device=src.device, solver=src.recipe.deq.eval_settings().spec(),
                     precision=src.recipe.runtime.precision)
        rows.append((rule.describe(), audit.summary()))
    return rows


def generate_rows(run: Path, tokens: int) -> list[tuple[str, dict]]:
    """Per rule, greedy generation from a test-text prompt, each token solved twice."""
    src = open_source(str(run), [])
    rows = []
    for rule in RULES:
        src.model.deq.readout_stop = rule
        gen = Generator(src.model, solver=src.recipe.deq.eval_settings().spec(),
                        device=src.device, precision=src.recipe.runtime.precision,
                        compare=True)
        ids, _ = gen.encode(PROMPT)
        out = list(gen.generate(ids, tokens, Sampler(greedy=True)))
        nfe, ref = sum(t.nfe for t in out), sum(t.residual_nfe for t in out)
        rows.append((rule.describe(), {
            "fwd_nfe": nfe / len(out), "residual_fwd_nfe": ref / len(out),
            "nfe_ratio": nfe / ref, "nfe_ratio_batch": nfe / ref,
            "agreement": sum(t.agrees for t in out) / len(out)}))
    return rows


def show(title: str, rows: list[tuple[str, dict]]) -> None:
    print(f"\n{title}")
    print(f"{'rule':<28}{'NFE':>7}{'resid NFE':>11}{'ratio':>8}{'batch':>8}{'agree':>9}"
          f"{'agree conv':>12}  target")
    for name, r in rows:
        ok = r["nfe_ratio"] <= 0.7 and r["agreement"] >= 0.995
        conv = r.get("agreement_converged")      # where the residual solve converged
        print(f"{name:<28}{r['fwd_nfe']:>7.2f}{r['residual_fwd_nfe']:>11.2f}"
              f"{r['nfe_ratio']:>7.2f}x{r['nfe_ratio_batch']:>7.2f}x{r['agreement']:>9.2%}"
              f"{'-' if conv is None else f'{conv:.2%}':>12}  {'met' if ok else '-'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mnist", type=Path, help="a run of configs/mnist-deq.yaml")
    ap.add_argument("--lm", type=Path, help="a run of configs/shakespeare-deq.yaml")
    ap.add_argument("--train", action="store_true", help="train the missing runs briefly")
    ap.add_argument("--out", type=Path, default=Path("bench-runs"), help="where --train writes")
    ap.add_argument("--tokens", type=int, default=200, help="tokens generated per rule")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mnist = args.mnist or (train("mnist", args.out) if args.train else None)
    lm = args.lm or (train("lm", args.out) if args.train else None)
    if mnist is None and lm is None:
        ap.error("give --mnist RUN and/or --lm RUN, or --train")
    if mnist is not None:
        show(f"eval, test split: {mnist}", eval_rows(mnist))
    if lm is not None:
        show(f"generate, {args.tokens} greedy tokens per rule: {lm}",
             generate_rows(lm, args.tokens))


if __name__ == "__main__":
    main()
