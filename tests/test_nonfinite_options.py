"""Options whose float32 arithmetic would leave the scores non-finite (issue 28, item 1): refused when
GenerationSettings is built, before any work, in one line with a hint (exit 2 on the command line, 400 from the
server), with no numpy warning; the values at the documented limits still generate, without a warning."""

import re
import subprocess
import sys
import warnings

import pytest
from fastapi.testclient import TestClient

from gpt2onnx.errors import InvalidArgumentError
from gpt2onnx.generation.engine import Engine, EngineOptions
from gpt2onnx.generation.settings import GenerationSettings
from gpt2onnx.serving.openai_api import ApiError, parse_completion_request, prepare
from gpt2onnx.serving.server import ServerOptions, create_app
from helpers import one_error, run_cli

# Refused options and a part of the message each one gets. Each of them broke generation before: a NaN softmax
# ("probability tensor contains either inf, nan...") after numpy's RuntimeWarnings, an OverflowError traceback, or
# overflow warnings ("overflow encountered in cast") for a value float32 cannot hold.
REFUSED = [
    (dict(do_sample=True, temperature=1e-300), "temperature must be 0 (greedy) or a number from 1e-30 to 1e+30"),
    (dict(do_sample=True, temperature=1e-40), "temperature must be 0 (greedy) or a number from 1e-30"),
    (dict(do_sample=True, temperature=9e-31), "temperature must be 0 (greedy) or a number from 1e-30"),
    (dict(do_sample=False, temperature=1e-300), "temperature must be 0 (greedy) or a number from 1e-30"),
    (dict(do_sample=True, temperature=1e300), "temperature must be 0 (greedy) or a number from 1e-30 to 1e+30"),
    (dict(repetition_penalty=1e-300), "repetition_penalty must be a number from 1e-30 to 1e+30"),
    (dict(do_sample=True, repetition_penalty=1e-40), "repetition_penalty must be a number from 1e-30 to 1e+30"),
    (dict(do_sample=True, repetition_penalty=1e300), "repetition_penalty must be a number from 1e-30 to 1e+30"),
    (dict(do_sample=True, sequence_bias=[[[5], float("inf")]]), "finite numbers or -inf as biases"),
    # each value within its own limit, but together past float32's range
    (dict(do_sample=True, temperature=1e-30, repetition_penalty=1e30), "temperature=1e-30, repetition_penalty=1e+30"
                                                                        " can take a score to"),
    (dict(do_sample=True, temperature=1e-20, sequence_bias=[[[5], 1e20]]), "temperature=1e-20, sequence_bias can"),
    (dict(sequence_bias=[[[5], 1e38], [[6, 5], 1e38]]), "sequence_bias can take a score to 2.0e+38"),
    (dict(num_beams=2, length_penalty=1e300), "length_penalty=1e+300 with max_new_tokens=20"),
    (dict(num_beams=2, length_penalty=-200.0, max_new_tokens=5), "length_penalty=-200 with max_new_tokens=5"),
]


@pytest.mark.parametrize("options,message", REFUSED, ids=[repr(o) for o, _ in REFUSED])
def test_settings_refuse_what_makes_the_scores_non_finite(options, message):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided from the values alone: no numpy arithmetic, no warning
        with pytest.raises(InvalidArgumentError, match=re.escape(message)) as error:
            GenerationSettings(**options)
    assert error.value.hint and "\n" not in error.value.message


def test_generate_refuses_before_any_work(tiny, monkeypatch):
    """Model.generate refuses from the settings: the model never runs."""
    monkeypatch.setattr(tiny.session, "run", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(InvalidArgumentError, match="temperature must be 0"):
        tiny.generate("hi", do_sample=True, temperature=1e-300, max_new_tokens=3)


# The limits themselves, and options that look extreme but keep the scores finite, generate without a warning.
ACCEPTED = [
    dict(do_sample=True, temperature=1e-30),
    dict(do_sample=True, temperature=1e30),
    dict(do_sample=True, repetition_penalty=1e-30),
    dict(do_sample=True, repetition_penalty=1e30),
    dict(do_sample=True, temperature=1e-30, repetition_penalty=100.0, frequency_penalty=-2.0, presence_penalty=2.0,
         logit_bias={5: 100}),
    dict(do_sample=True, temperature=1e-30, sequence_bias=[[[5], float("-inf")], [[7], 1e4]]),
    dict(num_beams=2, length_penalty=10.0, max_new_tokens=6),
    dict(num_beams=2, length_penalty=-2.0, max_new_tokens=6),
    dict(do_sample=True, epsilon_cutoff=1e-300, eta_cutoff=1e-300, typical_p=1e-300, min_p=1e-300),
]


@pytest.mark.parametrize("options", ACCEPTED, ids=[repr(o) for o in ACCEPTED])
def test_options_at_the_limits_generate_without_warnings(tiny, options):
    options = {"max_new_tokens": 6, "seed": 1, **options}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = tiny.generate("hello hello hello", **options)
    assert len(result.token_ids) > 0


def test_the_smallest_temperature_samples_the_greedy_tokens(tiny):
    """At temperature 1e-30 the likeliest token holds all the probability: sampling gives the greedy tokens."""
    greedy = tiny.generate("hello there", max_new_tokens=8, ignore_eos=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(3):
            sampled = tiny.generate("hello there", max_new_tokens=8, ignore_eos=True, do_sample=True, top_k=0,
                                    temperature=1e-30, seed=seed)
            assert sampled.token_ids == greedy.token_ids


def test_decay_keeps_a_banned_end_token_banned(tiny):
    """min_new_tokens bans <|endoftext|> (-inf) while the decay length penalty raises it: transformers' arithmetic
    gives -inf + inf = NaN (sampling failed); the ban holds, and sampling goes on without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for do_sample in (True, False):
            result = tiny.generate("hi", do_sample=do_sample, seed=1, min_new_tokens=10, max_new_tokens=12,
                                   exponential_decay_length_penalty=(2, 1.5))
            assert tiny.eos_id not in result.token_ids[:10]


def test_decay_past_float32_makes_the_end_token_certain(tiny):
    """A decay whose growth passes float32's range (ignore_eos keeps the row going) gave +inf, a NaN softmax; the
    end token's score now stops at the largest the temperature keeps finite, and it is then certain."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for temperature in (1.0, 0.5, 1e-30):
            result = tiny.generate("hi", do_sample=True, seed=1, max_new_tokens=8, ignore_eos=True,
                                   temperature=temperature, exponential_decay_length_penalty=(0, 1e30))
            assert result.token_ids[2:] == [tiny.eos_id] * 6, result.token_ids


# -- the command line: exit 2, one line and its hint, nothing else --------------------------------------------


CLI_REFUSED = [
    (["--do-sample", "--temperature", "1e-300"], "temperature must be 0 (greedy) or a number from 1e-30 to 1e+30, "
                                                 "got 1e-300"),
    (["--do-sample", "--temperature", "1e-40"], "temperature must be 0 (greedy) or a number from 1e-30"),
    (["--repetition-penalty", "1e-300"], "repetition_penalty must be a number from 1e-30 to 1e+30"),
    (["--do-sample", "--sequence-bias", "[[[5], Infinity]]"], "finite numbers or -inf as biases"),
    (["--num-beams", "2", "--length-penalty", "1e300"], "length_penalty=1e+300"),
]


@pytest.mark.parametrize("options,message", CLI_REFUSED, ids=[" ".join(o) for o, _ in CLI_REFUSED])
def test_cli_refuses_in_one_line(tiny_export, capsys, options, message):
    code, out, err = run_cli(capsys, "generate", "hi", "-m", tiny_export, *options)
    assert code == 2 and out == ""
    assert message in one_error(err)


def test_cli_prints_no_numpy_warning(tiny_export):
    """The issue's command, as a user runs it: two lines on stderr (the error, its hint), no RuntimeWarning."""
    run = subprocess.run([sys.executable, "-m", "gpt2onnx", "generate", "hi", "-m", str(tiny_export), "--do-sample",
                          "--temperature", "1e-300"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert "temperature must be 0 (greedy)" in one_error(run.stderr)
    ok = subprocess.run([sys.executable, "-W", "error", "-m", "gpt2onnx", "generate", "hi", "-m", str(tiny_export),
                         "--do-sample", "--temperature", "1e-30", "--max-new-tokens", "4"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() and ok.stderr == "", ok.stderr


# -- the server: 400 before any work ------------------------------------------------------------------------


def test_openai_mapping_refuses_while_preparing(tiny):
    """The request's GenerationSettings refuse it while it is prepared, before the engine sees it (as the settings'
    InvalidArgumentError, or as the 400 the server answers)."""
    body = parse_completion_request(b'{"prompt": "hi", "temperature": 1e-300}', vocab_size=tiny.config.vocab_size,
                                    max_n=4)
    with pytest.raises((InvalidArgumentError, ApiError), match="temperature must be 0") as error:
        prepare(body, encode=tiny.tokenizer.encode, decode=tiny.tokenizer.decode,
                n_positions=tiny.config.n_positions)
    assert getattr(error.value, "status", 400) == 400


@pytest.fixture(scope="module")
def app_client(tiny):
    engine = Engine(tiny, EngineOptions(max_batch=4, max_queue=8))
    try:
        with TestClient(create_app(engine, ServerOptions(model_name="tiny"))) as client:
            yield client
    finally:
        engine.close(drain=False)


@pytest.mark.parametrize("body,param", [({"temperature": 1e-300}, "temperature"),
                                        ({"temperature": 1e-40, "n": 2}, "temperature"),
                                        ({"repetition_penalty": 1e-300}, "repetition_penalty"),
                                        ({"temperature": 1e-30, "repetition_penalty": 1e30}, None)])
def test_server_answers_400(app_client, body, param):
    response = app_client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "\n" not in error["message"]
    assert (param or "can take a score") in error["message"]
    ok = app_client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "temperature": 1e-30})
    assert ok.status_code == 200, ok.text
