"""`deqctl data RECIPE [key.sub=value ...] [--json]`: prepare a recipe's data without
training (download or read, tokenize, cache) and say what a model will see, with the
recipe's model and its parameter count (built on the meta device: no memory, no time)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, List, Optional

import torch
import typer
from rich.console import Console

from .. import recipe as recipes
from ..data import DataBundle, build_data
from ..models import build_model
from ..ui.work import work_shown_on
from .common import USAGE, fail, say_user_code, split_args, user_errors


@user_errors
def data_command(
    args: Optional[List[str]] = typer.Argument(
        None, help="RECIPE.yaml followed by overrides key.sub=value"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout, nothing else"),
) -> None:
    """Prepare a recipe's data (download or read, tokenize, cache) and describe it and the
    recipe's model, without training: run it once where the data can be fetched."""
    path, overrides = split_args(args)
    if path is None:
        fail("missing RECIPE.yaml (e.g. deqctl data configs/shakespeare-deq.yaml)", USAGE)
    # what user code prints while it is imported or run goes to stderr: with --json,
    # stdout holds the one JSON object and nothing else
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        recipe = recipes.load(path, overrides)
        say_user_code(recipe)
        with work_shown_on(Console(stderr=True)):      # tokenizing a corpus takes minutes
            bundle = build_data(recipe.data)
        model = _parameters(recipe, bundle)
    report = describe(bundle, model)
    if as_json:
        typer.echo(json.dumps(report))
        return
    for line in lines(report, bundle.notes):
        typer.echo(line)


def _parameters(recipe, bundle: DataBundle) -> dict[str, Any]:
    """The recipe's model for this data, built on the meta device: its name and counts."""
    with torch.device("meta"):
        model = build_model(recipe, bundle.info)
    params = list(model.parameters())
    name = "baseline" if recipe.deq.mode == "baseline" else recipe.part("model").ref
    return {"name": name, "parameters": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


def describe(bundle: DataBundle, model: dict[str, Any]) -> dict[str, Any]:
    """What `deqctl data --json` prints: the data's description (a tokenizer's JSON left
    out), each split's size and facts, the token files, and the model."""
    info = bundle.info
    splits = {}
    for part in ("train", "val", "test"):
        split = getattr(bundle, part)
        if split is None:
            continue
        entry: dict[str, Any] = {"samples": len(split)}
        for fact, values in bundle.facts.items():
            if isinstance(values, dict) and part in values:
                entry[fact] = values[part]
        if "token_files" in entry:
            entry["token_file_bytes"] = os.path.getsize(entry["token_files"])
        splits[part] = entry
    described = {k: v for k, v in info.as_dict().items() if k != "vocab" or info.tokenizer == "char"}
    return {"data": {**described, "inputs_are": info.describe_inputs(),
                     "vocab_size": info.vocab_size}, "splits": splits, "model": model}


def lines(report: dict[str, Any], notes: list[str]) -> list[str]:
    """The plain-text report: the data, a line per split, the vocabulary or classes, the
    model."""
    data, out = report["data"], []
    out.append(f"data {data['name']}: {data['task']}, {data['inputs_are']}")
    for part, s in report["splits"].items():
        text = f"  {part:<5} {s['samples']:>10,} samples"
        if "tokens" in s:
            text += f"  {s['tokens']:>13,} tokens  {s.get('unknown_tokens', 0):,} unknown"
        if "token_files" in s:
            text += f"  {s['token_files']} ({s['token_file_bytes'] / 2**20:.1f} MiB)"
        out.append(text)
    if data.get("vocab_size"):
        out.append(f"  vocabulary: {data['tokenizer']}, {data['vocab_size']:,} ids")
    if data.get("num_classes"):
        names = data.get("classes") or []
        shown = ", ".join(names[:10]) + (f", ... ({len(names)})" if len(names) > 10 else "")
        out.append(f"  classes: {data['num_classes']}" + (f" ({shown})" if names else ""))
    if data.get("target_shape"):
        out.append(f"  forecast: {data['shape'][0]} steps seen, targets shaped "
                   f"{tuple(data['target_shape'])}")
    out.extend(f"  note: {n}" for n in notes)
    m = report["model"]
    out.append(f"model {m['name']}: {m['parameters']:,} parameters "
               f"({m['trainable']:,} trainable; counted on the meta device)")
    return out
