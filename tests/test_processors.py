"""transformers' other decoding options (min_p, typical_p, epsilon/eta cut-offs, bad words, suppressed tokens,
sequence bias, forced tokens, length penalty, renormalisation, stop_strings, max_time, output_scores): the
token ids of transformers' own generate after set_seed, on the trained model, left-padded batches of 1 and 3;
a flip must be a near-tie that export/parity.py explains. Also the processors one by one against
transformers' own processor list, the engine against generate, and bad values."""

import json
import math

import numpy as np
import pytest

from gpt2onnx.errors import InvalidArgumentError
from gpt2onnx.generation.defaults import TRANSFORMERS_DEFAULTS
from gpt2onnx.generation.engine import Engine
from gpt2onnx.generation.sampling import process
from gpt2onnx.generation.settings import GenerationSettings
from gpt2onnx.tools.cli import main
from helpers import transformers_generate

PROMPTS = ("Hello, I'm a language model,", "The history of", "naïve café — 日本語 😀")
TOKENS = 12
TAB, NEWLINE, STAR, THE = 197, 198, 9, 262  # tokens the trained model writes often
# one setting per option (sampling; greedy too where the option applies to greedy decoding)
OPTIONS = {
    "min_p": dict(min_p=0.1, top_k=0),
    "min_p with temperature": dict(min_p=0.05, temperature=1.5, top_k=0),
    "typical_p": dict(typical_p=0.9, top_k=0),
    "epsilon_cutoff": dict(epsilon_cutoff=3e-3, top_k=0),
    "eta_cutoff": dict(eta_cutoff=2e-3, top_k=0),
    "all warpers": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.02, typical_p=0.95, epsilon_cutoff=1e-4,
                        eta_cutoff=1e-4),
    "bad_words_ids": dict(bad_words_ids=[[TAB], [NEWLINE, STAR], [50256]]),
    "suppress_tokens": dict(suppress_tokens=[TAB, NEWLINE, STAR]),
    "begin_suppress_tokens": dict(begin_suppress_tokens=[NEWLINE, THE]),
    "sequence_bias": dict(sequence_bias={(TAB,): -3.0, (NEWLINE, STAR): 4.0, (STAR,): 1.5}),
    "forced_eos_token_id": dict(forced_eos_token_id=50256),
    "exponential_decay_length_penalty": dict(exponential_decay_length_penalty=(4, 1.5)),
    "renormalize_logits": dict(renormalize_logits=True, top_p=0.9),
    "stop_strings": dict(stop_strings=["*", "\n\n"]),
}
GREEDY_TOO = ("bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "sequence_bias", "forced_eos_token_id",
              "exponential_decay_length_penalty", "renormalize_logits", "stop_strings")


@pytest.fixture(scope="module")
def side(trained, trained_reference):
    """Our trained export and transformers' model side by side (export/parity.py), torch on one thread."""
    import torch

    from gpt2onnx_export.parity import SideBySide

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield SideBySide(trained, *trained_reference, atol=1e-4)
    torch.set_num_threads(before)


def _cases(setting: dict, seeds=range(5), greedy: bool = False, prompts=PROMPTS):
    from gpt2onnx_export.parity import _OPTIONS, Case

    options = tuple({**_OPTIONS, **setting}.items())
    cases = [Case(seed, prompts[:1] if seed % 2 == 0 else prompts[:3], options, TOKENS) for seed in seeds]
    return cases + ([Case(0, prompts[:3], options, TOKENS, do_sample=False)] if greedy else [])


def _check(side, cases) -> list[str]:
    """Every row equal to transformers' or an explained near-tie; the near-ties (for the message)."""
    explained = []
    for case in cases:
        report = side.run(case)
        unexplained = [d["text"] for d in report["divergences"] if not d["explained"]]
        assert not unexplained, (case.label(), unexplained)
        explained += [d["text"] for d in report["divergences"]]
    return explained


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_gives_transformers_tokens(side, name):
    near_ties = _check(side, _cases(OPTIONS[name], greedy=name in GREEDY_TOO))
    assert len(near_ties) <= 1, near_ties  # float noise flips a decision rarely; more is a bug to look at


def test_forced_bos_with_one_token_prompts(side):
    """forced_bos_token_id acts when the (padded) prompt is one token; begin_suppress_tokens then acts one
    step later (transformers' begin_index + 1)."""
    prompts = ("Hello", "The", "It")
    _check(side, _cases(dict(forced_bos_token_id=STAR, begin_suppress_tokens=[NEWLINE, TAB]), seeds=range(4),
                        greedy=True, prompts=prompts))
    first = side.model.generate(list(prompts), max_new_tokens=3, forced_bos_token_id=STAR)
    assert [g.token_ids[0] for g in first] == [STAR] * 3
    assert side.model.generate("Hello there", max_new_tokens=3, forced_bos_token_id=STAR).token_ids[0] != STAR


def test_processors_equal_transformers_processor_list(trained_reference):
    """Random logits through transformers' own `_get_logits_processor` (its list and order for a config) and
    through ours: the same tokens are removed, the rest equal to float32 rounding."""
    import torch
    from transformers import GenerationConfig

    reference, _ = trained_reference
    rng = np.random.default_rng(0)
    vocab, eos = reference.config.vocab_size, 50256
    for trial in range(12):
        batch, width, new = 3, int(rng.integers(1, 6)), int(rng.integers(0, 6))
        sequences = rng.integers(0, 30, (batch, width + new))  # a small range: repeats and matches happen
        sequences[:, -1] = rng.integers(0, 3, batch)
        logits = (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)
        logits[:, :40] += 4  # the low ids (the ones in the sequences) are the likely ones
        options = dict(do_sample=trial % 4 != 3, temperature=float(rng.uniform(0.5, 1.5)), top_k=[0, 20][trial % 2],
                       top_p=[1.0, 0.9][trial % 3 == 0], min_p=[None, 0.05][trial % 2],
                       typical_p=[1.0, 0.9][trial % 3 == 1], epsilon_cutoff=[0.0, 1e-3][trial % 3 == 2],
                       eta_cutoff=[0.0, 2e-3][trial % 4 == 1], repetition_penalty=1.2,
                       bad_words_ids=[[1], [2, 3], [0, 1, 2], [eos]], suppress_tokens=[4, 5],
                       begin_suppress_tokens=[6, 7], sequence_bias={(8,): 2.5, (1, 9): -1.5, (2, 10): 3.0},
                       forced_bos_token_id=[None, 11][trial % 5 == 0], forced_eos_token_id=[None, 12][trial % 5 == 1],
                       # (not with a forced token: |-inf| x growth makes transformers' EOS score NaN)
                       exponential_decay_length_penalty=[None, (1, 1.3)][trial % 2 and trial % 5 > 1],
                       renormalize_logits=trial % 3 == 0, no_repeat_ngram_size=2, min_new_tokens=2)
        max_new_tokens = new + int(rng.integers(1, 3))
        config = GenerationConfig(**options, max_length=width + max_new_tokens, eos_token_id=eos)
        config._eos_token_tensor = torch.tensor([eos])
        processors = reference._get_logits_processor(config, input_ids_seq_length=width, device="cpu")
        expected = processors(torch.from_numpy(sequences), torch.from_numpy(logits.copy())).numpy()
        ours = process(logits, sequences, new, GenerationSettings(max_new_tokens=max_new_tokens, **options), eos_id=eos)
        assert np.array_equal(np.isinf(ours), np.isinf(expected)), (trial, options)
        finite = np.isfinite(expected)
        np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-5, atol=1e-5, err_msg=str(trial))


def test_output_scores_equal_compute_transition_scores(trained, trained_reference):
    """Generation.scores: the processed log-probability of each chosen token, as transformers'
    compute_transition_scores(sequences, scores, normalize_logits=True) gives it."""
    import torch
    from transformers import set_seed

    reference, tokenizer = trained_reference
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.eos_token
    options = dict(do_sample=True, temperature=0.8, top_k=0, min_p=0.05, repetition_penalty=1.2)
    batch = tokenizer(list(PROMPTS), return_tensors="pt", padding=True)
    set_seed(3)
    with torch.inference_mode():
        out = reference.generate(**batch, max_new_tokens=TOKENS, pad_token_id=50256, output_scores=True,
                                 return_dict_in_generate=True, **options)
    expected = reference.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).numpy()
    ours = trained.generate(list(PROMPTS), max_new_tokens=TOKENS, seed=3, output_scores=True,
                            return_dict_in_generate=True, **options)
    width = batch["input_ids"].shape[1]
    for row, generation in enumerate(ours):
        assert generation.token_ids == out.sequences[row, width:width + len(generation.token_ids)].tolist()
        np.testing.assert_allclose(generation.scores, expected[row, :len(generation.scores)], atol=1e-4)
    assert trained.generate(PROMPTS[0], max_new_tokens=2).scores is None


def test_stop_strings_keep_the_completing_token_stop_cuts(trained):
    """stop_strings end a row at the token completing the string, kept in the text (transformers'); `stop`
    matches the decoded text and cuts it. Both give finish_reason "stop"; stream and engine agree."""
    plain = trained.generate(PROMPTS[0], max_new_tokens=TOKENS)
    star = plain.token_ids.index(STAR)
    kept = trained.generate(PROMPTS[0], max_new_tokens=TOKENS, stop_strings="*")
    assert kept.token_ids == plain.token_ids[:star + 1] and kept.text.endswith("*")
    assert kept.finish_reason == "stop"
    cut = trained.generate(PROMPTS[0], max_new_tokens=TOKENS, stop=["*"])
    assert cut.text == kept.text[:-1] and cut.finish_reason == "stop"
    assert "".join(trained.stream(PROMPTS[0], max_new_tokens=TOKENS, stop_strings="*")) == kept.text
    with Engine(trained) as engine:
        ids = trained.encode_prompt(PROMPTS[0])
        (row,) = engine.submit(ids, GenerationSettings(max_new_tokens=TOKENS, stop_strings=("*",))).result(60)
    assert (row.token_ids, row.text, row.finish_reason) == (kept.token_ids, kept.text, "stop")
    # the prompt counts, as in transformers: a prompt ending in "\n" stops at a first new "\n"
    # (a bias makes "\n" every new token: counting only new text would stop at the second one)
    forced = dict(max_new_tokens=5, sequence_bias={(NEWLINE,): 100.0})
    assert trained.generate("a\n", stop_strings="\n\n", **forced).token_ids == [NEWLINE]
    assert trained.generate("a", stop_strings="\n\n", **forced).token_ids == [NEWLINE, NEWLINE]


def test_max_time_ends_every_row_with_length(trained):
    results = trained.generate(list(PROMPTS), max_new_tokens=TOKENS, max_time=1e-9, ignore_eos=True)
    assert [len(r.token_ids) for r in results] == [1, 1, 1] and {r.finish_reason for r in results} == {"length"}
    long = trained.generate(list(PROMPTS), max_new_tokens=TOKENS, max_time=600)
    assert [r.token_ids for r in long] == [r.token_ids for r in trained.generate(list(PROMPTS), max_new_tokens=TOKENS)]
    with Engine(trained) as engine:
        (row,) = engine.submit(trained.encode_prompt(PROMPTS[1]), GenerationSettings(
            max_new_tokens=TOKENS, max_time=1e-9, ignore_eos=True)).result(60)
    assert len(row.token_ids) == 1 and row.finish_reason == "length"


@pytest.mark.parametrize("options", [
    dict(do_sample=True, seed=5, min_p=0.1, top_k=0), dict(do_sample=True, seed=6, typical_p=0.9, eta_cutoff=2e-3),
    dict(begin_suppress_tokens=[NEWLINE, THE], exponential_decay_length_penalty=(2, 2.0)),
    dict(do_sample=True, seed=7, sequence_bias=[[[NEWLINE, STAR], 4.0]], bad_words_ids=[[TAB]],
         forced_eos_token_id=[50256], renormalize_logits=True)])
def test_engine_rows_equal_generate(trained, options):
    """The engine samples with the same processors and the same context (prompt width, new tokens)."""
    with Engine(trained) as engine:
        requests = [(p, engine.submit(trained.encode_prompt(p), GenerationSettings(max_new_tokens=TOKENS, **options)))
                    for p in PROMPTS]
        for prompt, request in requests:
            (row,) = request.result(60)
            alone = trained.generate(prompt, max_new_tokens=TOKENS, **options)
            assert (row.token_ids, row.finish_reason) == (alone.token_ids, alone.finish_reason), prompt


BAD = [
    (dict(min_p=1.5), "min_p"), (dict(min_p=-0.1), "min_p"), (dict(typical_p=0), "typical_p"),
    (dict(typical_p=1.1), "typical_p"), (dict(epsilon_cutoff=1), "epsilon_cutoff"),
    (dict(eta_cutoff=-1e-3), "eta_cutoff"), (dict(bad_words_ids=[]), "bad_words_ids"),
    (dict(bad_words_ids=[1, 2]), "bad_words_ids"), (dict(bad_words_ids=[[]]), "bad_words_ids"),
    (dict(bad_words_ids=[[-1]]), "bad_words_ids"), (dict(suppress_tokens="1,2"), "suppress_tokens"),
    (dict(suppress_tokens=[1.5]), "suppress_tokens"), (dict(begin_suppress_tokens=[True]), "begin_suppress_tokens"),
    (dict(sequence_bias={}), "sequence_bias"), (dict(sequence_bias={(1,): "x"}), "sequence_bias"),
    (dict(sequence_bias=[[[1], math.nan]]), "sequence_bias"), (dict(sequence_bias={(): 1.0}), "sequence_bias"),
    (dict(forced_bos_token_id=-1), "forced_bos_token_id"), (dict(forced_eos_token_id=[]), "forced_eos_token_id"),
    (dict(forced_eos_token_id="a"), "forced_eos_token_id"),
    (dict(exponential_decay_length_penalty=(1,)), "exponential_decay_length_penalty"),
    (dict(exponential_decay_length_penalty=(-1, 1.5)), "exponential_decay_length_penalty"),
    (dict(exponential_decay_length_penalty=(1, 0)), "exponential_decay_length_penalty"),
    (dict(renormalize_logits=1), "renormalize_logits"), (dict(stop_strings=[""]), "stop_strings"),
    (dict(stop_strings=[]), "stop_strings"), (dict(max_time=0), "max_time"), (dict(max_time=math.nan), "max_time"),
    (dict(suppress_tokens=[10**6]), "vocab_size"), (dict(bad_words_ids=[[1, 99999]]), "vocab_size"),
    (dict(output_scores=1), "output_scores"), (dict(return_dict_in_generate="yes"), "return_dict_in_generate"),
]


@pytest.mark.parametrize("options,name", BAD, ids=[f"{name}-{i}" for i, (_, name) in enumerate(BAD)])
def test_bad_values_one_line_with_hint(tiny, options, name):
    with pytest.raises(InvalidArgumentError) as error:
        tiny.generate("Hello there", max_new_tokens=2, **options)
    assert name in error.value.message and "\n" not in str(error.value.message) and error.value.hint


# each flag with a value that changes transformers' tokens for CLI_PROMPT and seed CLI_SEED (checked below)
CLI_FLAGS = {
    "suppress": (["--suppress-tokens", f"{NEWLINE},{THE}"], dict(suppress_tokens=[NEWLINE, THE])),
    "bad words": (["--bad-words-ids", f"[[{NEWLINE}], [{THE}, {STAR}]]"], dict(bad_words_ids=[[NEWLINE], [THE, STAR]])),
    "sequence bias": (["--sequence-bias", f"[[[{STAR}], 6.0]]"], dict(sequence_bias={(STAR,): 6.0})),
    "min-p": (["--min-p", "0.2", "--top-k", "0"], dict(min_p=0.2, top_k=0)),
    "decay": (["--exponential-decay-length-penalty", "2,1.5"], dict(exponential_decay_length_penalty=(2, 1.5))),
    "forced eos": (["--forced-eos-token-id", "50256"], dict(forced_eos_token_id=50256)),
    "renormalize": (["--renormalize-logits", "--top-p", "0.5"], dict(renormalize_logits=True, top_p=0.5)),
}
CLI_PROMPT, CLI_SEED = PROMPTS[1], 3


@pytest.mark.parametrize("name", CLI_FLAGS)
def test_cli_flags_give_transformers_tokens(trained_export, trained_reference, capsys, name):
    """Each flag reaches the sampler: the CLI's tokens are transformers' with the same setting, which differ from
    its tokens without it (so an ignored flag fails)."""
    flags, options = CLI_FLAGS[name]
    expected, plain = (transformers_generate(*trained_reference, [CLI_PROMPT], CLI_SEED, o, TOKENS)[0]
                       for o in (options, {}))
    assert expected != plain  # the setting matters here
    assert main(["generate", CLI_PROMPT, "-m", str(trained_export), "--max-new-tokens", str(TOKENS), "--json",
                 "--do-sample", "--seed", str(CLI_SEED), *flags]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["token_ids"] == expected


def test_cli_stop_strings_and_max_time(trained_export, capsys):
    """Known values: a bias makes every new token "\\n", so --stop-strings "\\n\\n" ends the row after two (five
    without it), and a max time already over after one."""
    base = ["generate", "a", "-m", str(trained_export), "--max-new-tokens", "5", "--json",
            "--sequence-bias", f"[[[{NEWLINE}], 100.0]]"]
    for flags, expected in (([], [NEWLINE] * 5), (["--stop-strings", "\\n\\n"], [NEWLINE] * 2),
                            (["--max-time", "1e-9"], [NEWLINE])):
        assert main(base + flags) == 0
        (result,) = json.loads(capsys.readouterr().out)
        assert result["token_ids"] == expected, flags


def test_cli_bad_flags(tiny_export, capsys):
    args = ["generate", "Hello", "-m", str(tiny_export), "--max-new-tokens", "4", "--json"]
    for bad in (["--suppress-tokens", "a,b"], ["--bad-words-ids", "[[1"], ["--min-p", "2"],
                ["--exponential-decay-length-penalty", "2"]):
        try:
            code = main(args + bad)
        except SystemExit as exit_:  # argparse: a value its type cannot read
            code = exit_.code
        assert code == 2, bad
        assert "Traceback" not in capsys.readouterr().err


def test_new_options_have_transformers_defaults():
    """Each new option is in TRANSFORMERS_DEFAULTS with GenerationConfig's own default (so a model directory
    may set it and the pipeline takes it); test_generation checks the whole table."""
    from transformers import GenerationConfig

    config = GenerationConfig()
    names = {name for setting in OPTIONS.values() for name in setting} | {"forced_bos_token_id", "max_time"}
    assert {n: TRANSFORMERS_DEFAULTS[n] for n in names} == {n: getattr(config, n) for n in names}
