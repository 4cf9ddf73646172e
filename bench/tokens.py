"""Text at scale (issue 30): preparing a large corpus, and training memory that does not grow
with it. On a generated corpus (Zipf-distributed words, lines of 5-20 words):

1. preparing: BPE training plus encoding through deqctl's token cache (the BPE fitted on a
   `--sample-mb` sample spread over the corpus, as `data.bpe_sample_mb` does), beside what
   the Hugging Face tokenizers library manages alone on the same file (train_from_iterator
   over all its lines, then encode_batch over them), in the same run;
2. memory: the peak resident memory of `deqctl train` (a BPE language model, `--steps`
   steps, its token files prepared by the run itself, or found in --dir's cache when an
   earlier run there prepared them) on a small corpus and on the large one; the ratio
   large / small is the target (<= 1.10).

    python bench/tokens.py                      # 10 MB against 100 MB: ~8 min on 2 cores
    python bench/tokens.py --big-mb 1000        # the issue's 1 GB: ~40 min
    python bench/tokens.py --big-mb 200 --only prepare --repeats 2   # the ratio alone
    python bench/tokens.py --big-mb 1000 --only prepare --sample-mb 0  # deqctl fitting on all
    python bench/tokens.py --big-mb 1000 --only memory --dir DIR      # again, files prepared

Preparing is timed in turns (deqctl, alone, deqctl, alone, ...), each deqctl turn in a
fresh cache, so both meet the same machine; the ratio is the median of the turns'.

Figures are ratios measured in the same run; absolute times vary with the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 8192


def corpus(path: Path, megabytes: float, seed: int = 0) -> Path:
    """Write about `megabytes` MB of lines of Zipf-distributed made-up words to `path`."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(50_000)]
    target = int(megabytes * 2**20)
    with open(path, "w", encoding="utf-8") as fh:
        written = 0
        while written < target:
            ids = np.minimum(rng.zipf(1.2, size=200_000), len(words)) - 1
            cuts = np.cumsum(rng.integers(5, 21, size=len(ids) // 5))
            lines = [" ".join(words[i] for i in part) for part in np.split(ids, cuts[cuts < len(ids)])]
            text = "\n".join(lines) + "\n"
            fh.write(text)
            written += len(text)
    return path


def prepare_with_deqctl(train: Path, cache: Path, sample_mb: float | None
                        ) -> tuple[float, float, int]:
    """Seconds to fit the BPE (on a `sample_mb` sample, when given, as `data.bpe_sample_mb`)
    and seconds to then write the token file through deqctl's cache; token count."""
    from deqctl.data.tokens import TokenCache, text_file

    started = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)
    store = TokenCache(cache)
    text = text_file(train, str(train))
    tok = store.tokenizer("bpe", text, sample=sample_mb and sample_mb * 2**20,
                          vocab_size=VOCAB_SIZE)
    fitted = time.perf_counter()
    ids, meta = store.tokens(tok, text)
    return fitted - started, time.perf_counter() - fitted, meta["count"]


def prepare_with_tokenizers(train: Path) -> tuple[float, float, int]:
    """The same with the tokenizers library alone: train on all the lines, encode them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    started = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def lines():
        with open(train, encoding="utf-8") as fh:
            for line in fh:
                yield line.rstrip("\n")
    tok.train_from_iterator(lines(), trainer=trainer)
    fitted = time.perf_counter()
    count, batch = 0, []
    with open(train, encoding="utf-8") as fh:
        for line in fh:
            batch.append(line)
            if len(batch) == 100_000:
                count += sum(len(e.ids) for e in tok.encode_batch(batch))
                batch = []
    count += sum(len(e.ids) for e in tok.encode_batch(batch))
    return fitted - started, time.perf_counter() - fitted, count


def peak_rss_of_training(train: Path, test: Path, steps: int, workdir: Path) -> tuple[float, int]:
    """(seconds, peak RSS in MiB) of `deqctl train` on `train`, in a process of its own."""
    cmd = [sys.executable, "-m", "deqctl", "train", str(ROOT / "configs/shakespeare-deq.yaml"),
           "data.name=text", f"data.files.train={train}", f"data.files.test={test}",
           "data.tokenizer=bpe", f"data.vocab_size={VOCAB_SIZE}", f"data.root={workdir / 'cache'}",
           "data.limit_eval=64", f"train.max_steps={steps}", "train.log_every=50",
           # a small model: the memory that could grow with the corpus is the data's
           "model.d_model=64", "model.heads=4", "model.d_ff=128", "data.seq_len=64",
           "data.batch_size=16", "runtime.precision=fp32", "runtime.threads=2",
           "--out", str(workdir / f"run-{train.stem}"), "--plain"]
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True,
                          cwd=workdir)
    if done.returncode:
        sys.exit(f"deqctl train failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, int(done.stdout.strip().splitlines()[-1]) // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-mb", type=float, default=10)
    ap.add_argument("--big-mb", type=float, default=100)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--only", choices=["prepare", "memory"])
    ap.add_argument("--repeats", type=int, default=1, help="turns of preparing each way")
    ap.add_argument("--sample-mb", type=float, default=256,
                    help="deqctl's data.bpe_sample_mb (0: fit on all of the text)")
    args = ap.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="deqctl-bench-tokens-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; {os.cpu_count()} cores")
    small = corpus(work / "small.txt", args.small_mb, seed=1)
    big = corpus(work / "big.txt", args.big_mb, seed=2)
    test = corpus(work / "test.txt", 0.5, seed=3)
    mb = big.stat().st_size / 2**20

    if args.only != "memory":
        ratios = []
        for turn in range(args.repeats):
            fit, enc, n_ours = prepare_with_deqctl(big, work / f"prepare-cache-{turn}",
                                                   args.sample_mb or None)
            fit_alone, enc_alone, n_alone = prepare_with_tokenizers(big)
            ours, alone = fit + enc, fit_alone + enc_alone
            ratios.append(ours / alone)
            print(f"prepare {mb:.0f} MB (BPE {VOCAB_SIZE} + encode), turn {turn + 1}: deqctl "
                  f"{ours:.0f} s (fit {fit:.0f} s on {min(mb, args.sample_mb or mb):.0f} MB, "
                  f"encode {enc:.0f} s; {n_ours:,} tokens, {ours / 60 / mb * 1024:.1f} min/GB); "
                  f"tokenizers alone {alone:.0f} s (fit {fit_alone:.0f} s on all, encode "
                  f"{enc_alone:.0f} s; {n_alone:,} tokens, {alone / 60 / mb * 1024:.1f} min/GB); "
                  f"deqctl / alone = {ours / alone:.2f}", flush=True)
        print(f"prepare: deqctl / alone = {statistics.median(ratios):.2f} (median of "
              f"{len(ratios)} turns: {', '.join(f'{r:.2f}' for r in ratios)})")
    if args.only == "prepare":
        return
    t_small, rss_small = peak_rss_of_training(small, test, args.steps, work)
    t_big, rss_big = peak_rss_of_training(big, test, args.steps, work)
    print(f"train {args.steps} steps, peak RSS: {small.stat().st_size / 2**20:.0f} MB corpus "
          f"{rss_small} MiB ({t_small:.0f} s with preparing), {mb:.0f} MB corpus {rss_big} MiB "
          f"({t_big:.0f} s); large / small = {rss_big / rss_small:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
