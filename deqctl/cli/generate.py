"""`deqctl generate RUN [--prompt TEXT | --prompt-file F] [--tokens N] [--no-reuse] [--json]`"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import typer

from ..files import read_text
from ..inspect import open_source
from ..implicit import SolveSpec
from ..predict.generate import Generator, Sampler, Summary, Token
from ..ui.fmt import fmt_pct, fmt_sci
from ..numbers import strict_json
from .common import TRUST_CODE, USAGE, fail, reader_may_leave, split_args, user_errors

GENERATE_OVERRIDES = ("deq.eval", "runtime")
PROMPT_LIMIT = 2**20          # bytes of a prompt file: far beyond any context window


@user_errors
def generate(
    args: Optional[List[str]] = typer.Argument(
        None, help="RUN_OR_CHECKPOINT of a language model, then overrides deq.eval.*, runtime.*"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="the text to continue"),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file",
                                               help="read the prompt from a UTF-8 file"),
    tokens: int = typer.Option(200, "--tokens", min=1, max=100_000, help="tokens to generate"),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0, max=100.0,
                                      help="sampling temperature (0: greedy)"),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1,
                                        help="sample from the K most likely tokens only"),
    seed: int = typer.Option(0, "--seed", help="the sampling seed: the same seed, the same text"),
    greedy: bool = typer.Option(False, "--greedy", help="always the most likely token"),
    no_reuse: bool = typer.Option(False, "--no-reuse", help="solve every token from the cold "
                                  "start instead of reusing the previous fixed points"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object, nothing else"),
    trust_code: bool = TRUST_CODE,
) -> None:
    """Continue a text with a DEQ language model, streaming it; each token's solve starts
    from the previous token's fixed point. A summary of the solves follows on stderr."""
    path, overrides = split_args(args)
    if path is None:
        fail("missing RUN_OR_CHECKPOINT (e.g. deqctl generate runs/shakespeare-deq "
             "--prompt 'ROMEO:')", USAGE)
    text = _prompt(prompt, prompt_file)
    src = open_source(path, overrides, trust_code=trust_code, allowed=GENERATE_OVERRIDES)
    if src.info.task != "lm":
        fail(f"{path} is a {src.info.task} model; generate continues texts with a language "
             f"model (deqctl predict applies this one to inputs)", USAGE)
    solver = src.recipe.deq.eval_settings().spec()
    gen = Generator(src.model, solver=solver, device=src.device,
                    precision=src.recipe.runtime.precision, reuse=not no_reuse)
    ids, unknown = gen.encode(text)
    if not ids:
        fail("the prompt encodes to no tokens (only what the tokenizer drops, such as "
             "spaces); give it at least one word", USAGE)
    if unknown:
        tok = gen.tokenizer
        typer.echo(f"warning: {unknown} {tok.unit}(s) of the prompt are not in the training "
                   f"vocabulary; read as the unknown id {tok.unknown_id}", err=True)
    if not no_reuse and not gen.reuse:
        typer.echo("note: this model declares no causal time axis (or is an explicit "
                   "twin): every token is solved from the cold start", err=True)
    if not as_json:
        typer.echo(f"{src.label}: window {gen.window} tokens; {src.recipe.deq.describe_eval()}; "
                   f"{'reusing fixed points' if gen.reuse else 'cold start per token'}; "
                   f"device {src.device}", err=True)
        _replace_what_cannot_be_shown()
    sample = Sampler(temperature, top_k, greedy, seed)
    with reader_may_leave():
        if not as_json:
            _stream(text)
        out, start = [], time.perf_counter()
        for token in gen.generate(ids, tokens, sample):
            out.append(token)
            if not as_json:
                _stream(token.text)
        summary = Summary.of(out, time.perf_counter() - start)
        if as_json:     # ASCII (json.dumps escapes the rest): any terminal shows it
            typer.echo(json.dumps(strict_json(_report(out, len(ids), gen, solver, summary)),
                                  allow_nan=False))
            return
        _stream("\n")
    typer.echo(f"{summary.tokens} tokens in {summary.seconds:.1f} s "
               f"({summary.tokens_per_s:.1f} tokens/s); per token NFE mean "
               f"{summary.nfe_mean:.1f} max {summary.nfe_max}, rel residual mean "
               f"{fmt_sci(summary.rel_residual_mean)} max {fmt_sci(summary.rel_residual_max)}, "
               f"converged {fmt_pct(summary.converged)}", err=True)


def _report(out: list[Token], prompt_tokens: int, gen: Generator, solver: SolveSpec,
            summary: Summary) -> dict:
    """The --json object: the text, each token with its solve, the summary."""
    return {"text": "".join(t.text for t in out), "prompt_tokens": prompt_tokens,
            "reuse": gen.reuse, "window": gen.window, "solver": solver.as_dict(),
            **({"readout_stop": gen.model.deq.readout_stop.as_dict()}
               if gen.model.deq.readout_stop else {}),
            "tokens": [{"token": t.text, "id": t.id, "nfe": t.nfe,
                        "rel_residual": t.rel_residual, "converged": t.converged,
                        "window": t.window} for t in out],
            "summary": {**asdict(summary), "tokens_per_s": summary.tokens_per_s}}


# control characters but line ends and tabs: a checkpoint someone sent must not drive the
# terminal (ESC sequences, carriage returns over the prompt, bells)
_CONTROLS = {c: "\ufffd" for c in [*range(0x20), 0x7f, *range(0x80, 0xa0)] if c not in (9, 10)}


def _stream(text: str) -> None:
    """Write `text` to stdout now: the prompt and each token as it comes, all through the
    one stream (so all in its one encoding), control characters shown as U+FFFD."""
    sys.stdout.write(text.translate(_CONTROLS))
    sys.stdout.flush()


def _replace_what_cannot_be_shown() -> None:
    """Characters stdout's encoding cannot hold (LC_ALL=C with PYTHONIOENCODING=ascii, a
    byte model's stray bytes) are written as '?' rather than ending the command."""
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="replace")


def _prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt text, from --prompt or --prompt-file (exactly one); exit 2 otherwise."""
    if (prompt is None) == (prompt_file is None):
        fail("give the text to continue: --prompt TEXT or --prompt-file FILE (one of them)",
             USAGE)
    if prompt_file is not None:
        try:
            prompt = read_text(prompt_file, PROMPT_LIMIT)
        except UnicodeDecodeError:
            fail(f"--prompt-file {prompt_file}: not UTF-8 text", USAGE)
    if not prompt:
        fail("the prompt is empty; a model needs at least one token to continue", USAGE)
    return prompt
