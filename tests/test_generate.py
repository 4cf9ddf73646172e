"""`deqctl generate`: streaming continuation of a text, reproducible under a seed, and
fixed-point reuse that reaches the cold start's fixed points with fewer evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deqctl.cli import app
from deqctl.implicit import SolveSpec
from deqctl.predict.generate import Generator, Sampler

from cli_helpers import CONFIGS, runner

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "ROMEO:\nWhat light"


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    """A character model trained long enough (seconds) to say more than spaces."""
    out = tmp_path_factory.mktemp("lm") / "run"
    result = runner.invoke(app, [
        "train", str(CONFIGS / "shakespeare-deq.yaml"), "train.max_steps=60", "data.seq_len=24",
        "data.limit_train=512", "data.limit_eval=16", "data.batch_size=32",
        "data.eval_batch_size=16", "runtime.threads=1", "runtime.precision=fp32",
        "optim.lr=1e-2", "model={name: transformer_deq, d_model: 32, heads: 2, d_ff: 64}",
        "--out", str(out), "--plain"])
    assert result.exit_code == 0, result.output
    return out


def generate(*args: str):
    return runner.invoke(app, ["generate", *map(str, args)])


def as_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_generation_streams_the_continuation_then_a_summary(lm):
    result = generate(lm, "--prompt", PROMPT, "--tokens", "30", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(PROMPT) and len(result.stdout) > len(PROMPT) + 20
    assert "30 tokens in" in result.stderr and "per token NFE mean" in result.stderr
    data = as_json(generate(lm, "--prompt", PROMPT, "--tokens", "30", "--seed", "3", "--json"))
    assert PROMPT + data["text"] + "\n" == result.stdout     # the same text: --json drops the prompt
    assert len(data["tokens"]) == 30 and "".join(t["token"] for t in data["tokens"]) == data["text"]
    assert set(data["tokens"][0]) >= {"token", "nfe", "rel_residual", "converged"}
    s = data["summary"]
    assert s["tokens"] == 30 and s["nfe_max"] == max(t["nfe"] for t in data["tokens"])
    assert s["tokens_per_s"] > 0 and 0 <= s["converged"] <= 1


def test_the_same_seed_gives_the_same_text(lm):
    runs = [as_json(generate(lm, "--prompt", PROMPT, "--tokens", "40", "--seed", str(seed),
                             "--temperature", "1.5", "--json"))["text"] for seed in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]
    greedy = [as_json(generate(lm, "--prompt", PROMPT, "--tokens", "40", "--greedy", "--seed",
                               str(seed), "--json"))["text"] for seed in (1, 2)]
    assert greedy[0] == greedy[1]


def test_reuse_gives_the_cold_start_s_tokens_with_fewer_evaluations(lm):
    # 60 tokens through a 24-token window: appends and slides both; a tight tolerance, so
    # that both reach the same fixed points (at a loose one a near-tie may go either way)
    args = ["--prompt", PROMPT, "--tokens", "60", "--greedy", "--json", "deq.eval.tol=1e-5",
            "deq.eval.max_iter=200"]
    reuse, cold = as_json(generate(lm, *args)), as_json(generate(lm, *args, "--no-reuse"))
    assert {t["window"] for t in reuse["tokens"]} == {"cold", "append", "slide"}
    assert {t["window"] for t in cold["tokens"]} == {"cold"}
    assert reuse["text"] == cold["text"]
    assert reuse["summary"]["nfe_mean"] < 0.85 * cold["summary"]["nfe_mean"]
    assert reuse["summary"]["converged"] == 1


@pytest.mark.parametrize("name", ["transformer_deq", "tcn_deq"])
def test_a_reused_fixed_point_is_the_whole_window_s_fixed_point(tmp_path, name):
    """Solving only the new position, the earlier ones held, reaches the fixed point a
    cold solve of the whole window reaches (causal cells, tight tolerance)."""
    from deqctl.data import DataInfo
    from deqctl.models import build_model
    from deqctl.recipe import validate

    info = DataInfo(name="t", task="lm", inputs="tokens", shape=(12,), tokenizer="byte")
    model_cfg = {"name": name, **({"d_model": 16, "heads": 2, "d_ff": 32}
                                  if name == "transformer_deq" else {"channels": 8})}
    recipe = validate({"model": model_cfg, "data": {"name": "shakespeare", "tokenizer": "byte"}})
    torch.manual_seed(0)
    model = build_model(recipe, info).eval()
    tight = SolveSpec(solver="anderson", max_iter=200, tol=1e-7, stop_mode="rel")
    gen = Generator(model, solver=tight, device=torch.device("cpu"))
    x = torch.tensor([[72, 101, 108, 108, 111, 32, 119]])
    with torch.inference_mode():
        before, _ = gen._solve(model.inject(x[:, :-1]), None, "cold")
        reused, res = gen._solve(model.inject(x), before, "append")
        cold, full = gen._solve(model.inject(x), None, "cold")
    assert bool(res.converged.all()) and res.nfe < full.nfe
    assert torch.allclose(reused, cold, atol=1e-5, rtol=1e-4)


def test_prompts_and_models_that_cannot_be_continued(lm, run):
    warned = generate(lm, "--prompt", "Ω≈ç ROMEO", "--tokens", "3")
    assert warned.exit_code == 0
    assert warned.stderr.count("not in the training vocabulary") == 1
    for args, words in ((["--tokens", "3"], "--prompt TEXT or --prompt-file"),
                        (["--prompt", ""], "empty"),
                        (["--prompt-file", "/nonexistent/p.txt"], "p.txt")):
        result = generate(lm, *args)
        assert result.exit_code == 2 and words in result.stderr, result.output
    classifier = generate(run, "--prompt", "hi")
    assert classifier.exit_code == 2 and "deqctl predict" in classifier.stderr
    to_generate = runner.invoke(app, ["predict", str(lm), "x.txt"])
    assert to_generate.exit_code == 2 and "deqctl generate" in to_generate.stderr


def test_a_sampler_draws_from_the_top_k_only():
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0])
    draws = {Sampler(temperature=1.0, top_k=2, seed=s)(logits) for s in range(50)}
    assert draws == {1, 2}
    assert Sampler(greedy=True)(logits) == 1 == Sampler(temperature=0)(logits)
