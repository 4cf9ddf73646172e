"""Does reusing fixed points make generation cheaper, and does it change the text?
(issue 17). A trained language model continues 5 prompts from the unseen test play,
greedily, with fixed-point reuse and from the cold start, at the same tolerance.

    deqctl train configs/shakespeare-deq.yaml --out runs/shakespeare-deq    # ~14 min
    python bench/generate.py runs/shakespeare-deq                           # ~5 min
    python bench/generate.py runs/shakespeare-deq --tol 1e-3 deq.eval.max_iter=60

Per mode: f evaluations per token (mean), tokens/s, converged share. Then two agreements:
- as generated: the two greedy continuations compared position by position (one early
  difference changes every later context, so this is the strict measure);
- same context: at every step of the reuse run, the token a cold-start solve of exactly
  that context picks (a solve per step, forced along the reuse run's tokens), so that each
  step's decision is compared on its own.
Targets: reuse at most 0.5x the cold start's f evaluations per token; >= 95% agreement.
The two modes run back to back, prompt by prompt, so their tokens/s ratio is measured in
the same conditions; absolute rates say nothing across machines or runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from deqctl.inspect import open_source
from deqctl.predict.generate import Generator

TEST_PLAY = Path(__file__).resolve().parents[1] / "deqctl/data/embedded/shakespeare/test.txt"


def prompts(n: int, length: int = 96) -> list[str]:
    """`n` passages of the test play, spread over it, each starting at a line."""
    text = TEST_PLAY.read_text()
    out = []
    for k in range(n):
        at = text.index("\n", len(text) * (k + 1) // (n + 1)) + 1
        out.append(text[at:at + length])
    return out


def run(gen: Generator, ids: list[int], tokens: int, forced: list[int] | None = None):
    """(tokens, seconds, the greedy choice at every step); with `forced`, the run follows
    those tokens instead of its own choices (each step still solved and decided)."""
    choices: list[int] = []

    def pick(logits: torch.Tensor) -> int:
        choices.append(int(logits.float().argmax()))
        return forced[len(choices) - 1] if forced is not None else choices[-1]

    start = time.perf_counter()
    out = list(gen.generate(ids, tokens, pick))
    return out, time.perf_counter() - start, choices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a trained language model's run or checkpoint")
    ap.add_argument("overrides", nargs="*", help="deq.eval.* / runtime.* overrides, "
                    "e.g. deq.eval.max_iter=60")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--tol", type=float, default=None, help="eval tol (default: the recipe's)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    overrides = list(args.overrides) + ([f"deq.eval.tol={args.tol}"] if args.tol else [])
    if args.threads:
        overrides.append(f"runtime.threads={args.threads}")
    src = open_source(args.run, overrides)
    spec = src.recipe.deq.eval_settings().spec()
    make = (lambda reuse: Generator(src.model, solver=spec, device=src.device,
                                    precision=src.recipe.runtime.precision, reuse=reuse))
    reuse, cold = make(True), make(False)
    print(f"{args.run}: window {reuse.window}, eval solver {spec.describe()}, "
          f"{args.prompts} prompts x {args.tokens} greedy tokens, device {src.device}")
    totals = {"reuse": [0, 0.0, 0], "cold": [0, 0.0, 0]}       # nfe, seconds, converged
    agree = same_context = count = 0
    for k, text in enumerate(prompts(args.prompts)):
        ids, _ = reuse.encode(text)
        a, ta, _ = run(reuse, ids, args.tokens)
        b, tb, _ = run(cold, ids, args.tokens)
        _, _, cold_choices = run(cold, ids, args.tokens, forced=[t.id for t in a])
        for name, toks, secs in (("reuse", a, ta), ("cold", b, tb)):
            totals[name][0] += sum(t.nfe for t in toks)
            totals[name][1] += secs
            totals[name][2] += sum(t.converged for t in toks)
        agree += sum(x.id == y.id for x, y in zip(a, b))
        same_context += sum(t.id == c for t, c in zip(a, cold_choices))
        count += len(a)
        print(f"prompt {k + 1}: NFE/token reuse {sum(t.nfe for t in a) / len(a):.2f} cold "
              f"{sum(t.nfe for t in b) / len(b):.2f}; tokens/s reuse {len(a) / ta:.1f} cold "
              f"{len(b) / tb:.1f}; as generated {sum(x.id == y.id for x, y in zip(a, b))}/"
              f"{len(a)}; {''.join(t.text for t in a)[:60]!r}")
    (nr, sr, cr), (nc, sc, cc) = totals["reuse"], totals["cold"]
    ratio = nr / nc
    print(f"\nNFE per token: reuse {nr / count:.2f}, cold start {nc / count:.2f}; ratio "
          f"{ratio:.3f} (target <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'})")
    print(f"tokens/s: reuse {count / sr:.1f}, cold start {count / sc:.1f} (x{sc / sr:.2f})")
    print(f"converged: reuse {cr / count:.1%}, cold start {cc / count:.1%}")
    print(f"agreement as generated {agree / count:.1%}, at the same context "
          f"{same_context / count:.1%} (target >= 95%: "
          f"{'met' if agree / count >= 0.95 else 'NOT met'} as generated)")


if __name__ == "__main__":
    main()
