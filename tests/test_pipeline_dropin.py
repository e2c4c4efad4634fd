"""A true drop-in: code written for transformers' pipeline runs on gpt2onnx with only its import line changed,
and gives transformers' texts (transformers 4.57's real pipeline on the trained test model is the reference)."""

import ast
import json
import re
import threading
from pathlib import Path

import pytest

import gpt2onnx
from gpt2onnx.errors import InvalidArgumentError, ModelLoadError
from gpt2onnx.generation import seeding
from gpt2onnx.generation.pipeline import CALL_OPTIONS, ReturnType
from helpers import REPO, run_python

# The GPT-2 model card's example, as published (the seed article's script).
MODEL_CARD = """from transformers import pipeline, set_seed
generator = pipeline('text-generation', model='gpt2')
set_seed(42)
generator("Hello, I'm a language model,", max_length=30, num_return_sequences=5)
"""
PROMPTS = ["Hello , world !", "I 'm sure it 's fine", "naïve café — 日本語 😀", "fs.readFile(", "Once upon a time"]
SEEDS = range(5)


@pytest.fixture(autouse=True)
def _no_global_stream():
    """Every test starts and ends without a set_seed stream (other test modules rely on fresh seeds)."""
    seeding._reset()
    yield
    seeding._reset()


@pytest.fixture(scope="module")
def theirs(trained_dir):
    from transformers import pipeline

    return pipeline("text-generation", model=str(trained_dir), device="cpu")


@pytest.fixture(scope="module")
def ours(trained_export):
    return gpt2onnx.pipeline("text-generation", model=trained_export)


@pytest.fixture
def home(tmp_path, monkeypatch, trained_export):
    """An export home holding the trained test model's export under the name 'gpt2'."""
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "gpt2").symlink_to(trained_export, target_is_directory=True)
    monkeypatch.setenv("GPT2ONNX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _run_script(text: str):
    """Run a script's text in a fresh interpreter where torch and transformers cannot be imported; the value of
    its last line (an expression, as a notebook shows it) comes back as JSON."""
    code = f"""
import ast, json
tree = ast.parse({text!r})
last = tree.body.pop()
namespace = {{}}
exec(compile(tree, "script", "exec"), namespace)
print(json.dumps(eval(compile(ast.Expression(last.value), "script", "eval"), namespace)))
"""
    done = run_python(code, blocked=("torch", "transformers"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_model_card_script_runs_with_only_the_import_changed(home, theirs):
    """The seed article's script, its import line changed and nothing else, gives transformers' five texts."""
    from transformers import set_seed

    script = MODEL_CARD.replace("from transformers import", "from gpt2onnx import")
    assert [a for a, b in zip(script.splitlines(), MODEL_CARD.splitlines()) if a != b] == [
        "from gpt2onnx import pipeline, set_seed"]
    got = _run_script(script)
    last = ast.parse(MODEL_CARD).body[-1].value  # transformers on the trained weights, the same call
    set_seed(42)
    expected = theirs(*[ast.literal_eval(a) for a in last.args],
                      **{k.arg: ast.literal_eval(k.value) for k in last.keywords})
    assert got == expected
    assert len(got) == 5 and len({r["generated_text"] for r in got}) == 5


def test_a_model_name_not_exported_says_how_to_export_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2ONNX_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError) as error:
        gpt2onnx.pipeline("text-generation", model="gpt2")
    assert f"gpt2onnx export gpt2 {tmp_path / 'nowhere' / 'gpt2'}" in str(error.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        gpt2onnx.pipeline("text-generation", model=str(tmp_path / "missing-dir"))


def test_set_seed_continues_the_stream_as_transformers_does(ours, theirs, trained, trained_reference):
    """set_seed(s) then several calls in a row (pipeline with a string, with a list, greedy in between, then
    Model.generate and Model.stream with seed=None) give what the same calls give in transformers."""
    import torch
    from transformers import set_seed

    model, tokenizer = trained_reference
    ids = tokenizer(PROMPTS[0], return_tensors="pt")
    for seed in (42, *SEEDS):
        set_seed(seed)
        expected = [theirs(PROMPTS[0], max_new_tokens=12), theirs(PROMPTS[:3], max_new_tokens=8, top_p=0.9),
                    theirs(PROMPTS[1], max_new_tokens=5, do_sample=False)]
        with torch.inference_mode():
            for _ in range(2):
                out = model.generate(**ids, do_sample=True, max_new_tokens=10, pad_token_id=50256)
                expected.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        gpt2onnx.set_seed(seed)
        got = [ours(PROMPTS[0], max_new_tokens=12), ours(PROMPTS[:3], max_new_tokens=8, top_p=0.9),
               ours(PROMPTS[1], max_new_tokens=5, do_sample=False)]
        first = trained.generate(PROMPTS[0], do_sample=True, max_new_tokens=10)
        got += [first.text.replace("<|endoftext|>", ""),
                "".join(trained.stream(PROMPTS[0], do_sample=True, max_new_tokens=10))]
        assert got == expected, seed
        assert first.seed == seed  # the set_seed seed: set_seed(seed) and the same calls reproduce it


def test_a_seed_of_its_own_leaves_the_global_stream_alone(ours):
    gpt2onnx.set_seed(3)
    first = ours(PROMPTS[0], max_new_tokens=8)
    gpt2onnx.set_seed(3)
    ours(PROMPTS[1], max_new_tokens=8, seed=99)
    assert ours(PROMPTS[0], max_new_tokens=8) == first


def test_without_set_seed_every_call_draws_a_fresh_seed(trained):
    seeds = {trained.generate(PROMPTS[0], do_sample=True, max_new_tokens=2).seed for _ in range(4)}
    assert None not in seeds and len(seeds) == 4


def test_concurrent_calls_share_the_stream_without_losing_a_draw(trained):
    """Threads drawing from one set_seed stream interleave their draws (each under the lock): together they
    consume exactly what the same calls consume one after another."""
    gpt2onnx.set_seed(5)
    threads = [threading.Thread(target=trained.generate, args=(PROMPTS[i],),
                                kwargs=dict(do_sample=True, max_new_tokens=6, ignore_eos=True)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after_threads = seeding.global_stream().bit_generator.random_raw(4).tolist()
    gpt2onnx.set_seed(5)
    for i in range(4):
        trained.generate(PROMPTS[i], do_sample=True, max_new_tokens=6, ignore_eos=True)
    assert seeding.global_stream().bit_generator.random_raw(4).tolist() == after_threads


def _both(theirs, ours, inputs, seeds=SEEDS, **options):
    """transformers' pipeline after set_seed(seed), and ours with seed=seed: the same records."""
    from transformers import set_seed

    for seed in seeds:
        set_seed(seed)
        expected = theirs(inputs, **options)
        assert ours(inputs, seed=seed, **options) == expected, (seed, options)
    return expected


# every call option of transformers' TextGenerationPipeline, alone or with what it needs
CALLS = [
    dict(return_full_text=False),
    dict(return_full_text=True, clean_up_tokenization_spaces=False),
    dict(return_tensors=True),
    dict(return_tensors=False),  # transformers' quirk: still the token ids
    dict(return_text=True),
    dict(skip_special_tokens=False),
    dict(prefix="Once upon a time. "),
    dict(stop_sequence="."),
    dict(stop_sequence=" the", num_return_sequences=3),
    dict(eos_token_id=[13, 11], pad_token_id=0, num_return_sequences=3),  # finished rows padded with "!"
    dict(eos_token_id=198),
    dict(pad_token_id=50256),
    dict(truncation=True, max_length=4),  # max_length also truncates the prompt; max_new_tokens still wins
]
# a value for every generation option of ours that transformers' generate has (settings.OPTIONS)
GENERATE_VALUES = dict(max_length=None, max_new_tokens=None, min_new_tokens=dict(min_new_tokens=6, top_k=10),
                       do_sample=dict(do_sample=False), temperature=dict(temperature=1.3, top_k=0),
                       top_k=dict(top_k=5), top_p=dict(top_p=0.8, top_k=0),
                       repetition_penalty=dict(repetition_penalty=1.3),
                       no_repeat_ngram_size=dict(no_repeat_ngram_size=2),
                       num_return_sequences=dict(num_return_sequences=4),
                       num_beams=dict(num_beams=3, do_sample=False),
                       length_penalty=dict(num_beams=3, length_penalty=0.5),
                       early_stopping=dict(num_beams=3, early_stopping=True, num_return_sequences=2),
                       min_p=dict(min_p=0.1, top_k=0), typical_p=dict(typical_p=0.9, top_k=0),
                       epsilon_cutoff=dict(epsilon_cutoff=3e-4, top_k=0), eta_cutoff=dict(eta_cutoff=1e-3, top_k=0),
                       bad_words_ids=dict(bad_words_ids=[[13], [11]]), suppress_tokens=dict(suppress_tokens=[13, 11]),
                       begin_suppress_tokens=dict(begin_suppress_tokens=[383, 198]),
                       sequence_bias=dict(sequence_bias={(13,): -5.0, (11,): 3.0}),
                       forced_bos_token_id=dict(forced_bos_token_id=464),
                       forced_eos_token_id=dict(forced_eos_token_id=13),
                       exponential_decay_length_penalty=dict(exponential_decay_length_penalty=(3, 1.5)),
                       renormalize_logits=dict(renormalize_logits=True, top_k=20),
                       # stop_strings: transformers needs generate(tokenizer=...); tests/test_processors.py has them
                       stop_strings=None,
                       max_time=dict(max_time=60.0),  # far off: the same tokens (a timed stop is not reproducible)
                       # prompt lookup and assistants give plain decoding's tokens (tests/test_speculative.py);
                       # transformers' prompt lookup may return tokens past max_new_tokens
                       prompt_lookup_num_tokens=None, max_matching_ngram_size=None, num_assistant_tokens=None,
                       num_assistant_tokens_schedule=None)


@pytest.mark.parametrize("options", CALLS, ids=lambda o: ",".join(o))
def test_call_options_give_transformers_records(theirs, ours, options):
    options = {"max_new_tokens": 10, **options}
    _both(theirs, ours, PROMPTS[1], **options)
    _both(theirs, ours, PROMPTS[:3], seeds=SEEDS[:2], **options)


def test_every_generation_option_gives_transformers_records(theirs, ours):
    from transformers import GenerationConfig

    theirs_too = [name for name in CALL_OPTIONS if hasattr(GenerationConfig(), name)]
    assert [name for name in theirs_too if name not in GENERATE_VALUES] == [], "add a value to GENERATE_VALUES"
    for name in theirs_too:
        if GENERATE_VALUES[name] is not None:  # the lengths are what every other case sets
            _both(theirs, ours, PROMPTS[3], **{"max_new_tokens": 10, **GENERATE_VALUES[name]})


def test_return_type_and_handle_long_generation(theirs, ours):
    from transformers import set_seed
    from transformers.pipelines.text_generation import ReturnType as TheirReturnType

    for name in ("TENSORS", "NEW_TEXT", "FULL_TEXT"):
        set_seed(1)
        assert ours(PROMPTS[0], max_new_tokens=6, return_type=ReturnType[name], seed=1) == theirs(
            PROMPTS[0], max_new_tokens=6, return_type=TheirReturnType[name])
    saved = theirs.tokenizer.model_max_length, ours.tokenizer.model_max_length
    theirs.tokenizer.model_max_length = ours.tokenizer.model_max_length = 40  # the trained model's is unset
    try:
        _both(theirs, ours, "word " * 50, handle_long_generation="hole", max_new_tokens=10)
        # without max_new_tokens the hole is made for the generation config's max_length (20) minus the prompt,
        # whatever max_length the call passes (transformers' quirk); the pipeline then generates 256: greedy
        theirs.tokenizer.model_max_length = ours.tokenizer.model_max_length = 16
        _both(theirs, ours, "word " * 12, seeds=[0], handle_long_generation="hole", max_length=45, do_sample=False)
        with pytest.raises(InvalidArgumentError, match="cannot infer"):
            ours("word " * 50, handle_long_generation="hole")  # transformers: "We cannot infer how many new tokens"
    finally:
        theirs.tokenizer.model_max_length, ours.tokenizer.model_max_length = saved


@pytest.mark.parametrize("at", ["creation", "call"])
def test_batch_size_pads_left_like_transformers(trained_dir, trained_export, at):
    """batch_size=1 and 3 over 5 prompts of different lengths; GPT-2 needs a pad token first, as in transformers
    (whose own error says so), and left padding."""
    from transformers import pipeline

    create = {"batch_size": 3} if at == "creation" else {}
    call = {} if at == "creation" else {"batch_size": 3}
    theirs = pipeline("text-generation", model=str(trained_dir), device="cpu", **create)
    ours = gpt2onnx.pipeline("text-generation", model=trained_export, **create)
    with pytest.raises(ValueError, match="without pad_token cannot do batching"):
        theirs(PROMPTS, max_new_tokens=4, **call)
    with pytest.raises(InvalidArgumentError, match="needs a pad token"):
        ours(PROMPTS, max_new_tokens=4, **call)
    for generator in (theirs, ours):
        generator.tokenizer.pad_token_id = generator.model.config.eos_token_id
    with pytest.raises(InvalidArgumentError, match="'right' side"):  # transformers runs it, and warns: wrong results
        ours(PROMPTS, max_new_tokens=4, **call)
    theirs.tokenizer.padding_side = ours.tokenizer.padding_side = "left"
    _both(theirs, ours, PROMPTS, max_new_tokens=10, **call)
    if at == "creation":
        return  # the rest is the same pipeline code
    _both(theirs, ours, PROMPTS, max_new_tokens=8, repetition_penalty=1.4, return_tensors=True, **call)
    _both(theirs, ours, PROMPTS, max_new_tokens=8, num_return_sequences=2, stop_sequence=".", **call)
    _both(theirs, ours, PROMPTS, max_new_tokens=8, **{**call, "batch_size": 1})


def test_options_that_mean_nothing_here_are_accepted_with_one_warning_line(trained_export):
    with pytest.warns(UserWarning) as caught:
        generator = gpt2onnx.pipeline("text-generation", model=trained_export, device="cpu", torch_dtype="auto",
                                      model_kwargs={}, trust_remote_code=False)
    messages = [str(w.message) for w in caught]
    assert [m.split("=")[0].split()[-1] for m in messages] == ["device", "torch_dtype", "model_kwargs",
                                                                "trust_remote_code"]
    assert all("\n" not in m and "no effect" in m for m in messages)
    with pytest.warns(UserWarning, match=r"num_workers=2 has no effect") as caught:
        generator(PROMPTS[0], max_new_tokens=2, num_workers=2, seed=0)
    assert len(caught) == 1


def test_unknown_options_are_one_line_errors_listing_what_is_allowed(ours, trained_export):
    for call in (lambda: ours(PROMPTS[0], max_new_token=5), lambda: gpt2onnx.pipeline(
            "text-generation", model=trained_export, max_new_token=5)):
        with pytest.raises(InvalidArgumentError) as error:
            call()
        message, hint = str(error.value).split("\nHINT: ")
        assert message == "unsupported pipeline option(s) max_new_token"
        assert "max_new_tokens" in hint and "return_full_text" in hint and "device" in hint
    for bad, match in ((dict(handle_long_generation="middle"), "handle_long_generation"),
                       (dict(return_full_text=True, return_tensors=True), "mutually exclusive"),
                       (dict(eos_token_id=[]), "eos_token_id"), (dict(pad_token_id=-1), "pad_token_id"),
                       (dict(return_type="TEXT"), "return_type"), (dict(batch_size=0), "batch_size")):
        with pytest.raises(InvalidArgumentError, match=match):
            ours(PROMPTS[:2], max_new_tokens=2, **bad)
    with pytest.raises(InvalidArgumentError, match="task"):
        gpt2onnx.pipeline("summarization", model=trained_export)


def _migration_table() -> dict[str, str]:
    """The docs' "Migrating from transformers" page's table: option name -> status column."""
    section = (REPO / "docs" / "migrating.md").read_text()
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) >= 2:
            for name in re.findall(r"`([a-z_0-9]+)`", cells[0]):
                rows[name] = cells[1]
    return rows


def test_migration_table_lists_every_transformers_option():
    """Every field of transformers' GenerationConfig() and every option of its text-generation pipeline has a row
    with a status, so the table cannot silently miss one."""
    import inspect

    from transformers import GenerationConfig
    from transformers.pipelines.text_generation import TextGenerationPipeline

    table = _migration_table()
    fields = [k for k in GenerationConfig().to_dict() if not k.startswith("_") and k != "transformers_version"]
    pipeline_options = [p for p in inspect.signature(TextGenerationPipeline._sanitize_parameters).parameters
                        if p not in ("self", "generate_kwargs")]
    missing = [name for name in fields + pipeline_options + ["batch_size", "device"] if name not in table]
    assert missing == []
    statuses = {"same tokens", "accepted, no effect here", "refused"}
    assert [n for n, s in table.items() if not any(s.startswith(x) for x in statuses)] == []
    # what the code accepts is not marked refused, and what it refuses is not marked accepted
    accepted = set(CALL_OPTIONS) | {"pad_token_id", "eos_token_id"}
    assert [n for n in accepted if n in table and table[n].startswith("refused")] == []


def test_migrating_page_states_the_snippets_side_by_side():
    section = (REPO / "docs" / "migrating.md").read_text()
    assert MODEL_CARD.strip() in section
    assert MODEL_CARD.replace("from transformers import", "from gpt2onnx import").strip() in section


def test_the_import_surface():
    from gpt2onnx.generation.pipeline import pipeline

    assert gpt2onnx.pipeline is pipeline and gpt2onnx.set_seed is seeding.set_seed
    assert Path(gpt2onnx.generation.seeding.__file__).name == "seeding.py"


def test_beam_sampling_draws_from_the_set_seed_stream(ours, theirs):
    """The pipeline samples by default, so num_beams > 1 after set_seed is beam sampling on the global stream:
    the same records as transformers' set_seed + pipeline."""
    from transformers import set_seed

    set_seed(5)
    expected = theirs(PROMPTS[0], max_new_tokens=8, num_beams=3, num_return_sequences=2)
    gpt2onnx.set_seed(5)
    assert ours(PROMPTS[0], max_new_tokens=8, num_beams=3, num_return_sequences=2) == expected


def test_token_ids_out_of_the_vocabulary_are_refused_in_one_line(ours):
    with pytest.raises(InvalidArgumentError) as error:
        ours(PROMPTS[0], max_new_tokens=4, suppress_tokens=[10**6])
    assert "\n" not in error.value.message and error.value.hint


def test_beam_search_refuses_what_it_cannot_honour(ours):
    with pytest.raises(InvalidArgumentError, match="stop_strings"):
        ours(PROMPTS[0], max_new_tokens=4, num_beams=2, do_sample=False, stop_strings=["."])


def _two_eos_ids(theirs) -> tuple[list[int], int, int]:
    """Two token ids of transformers' greedy continuation of PROMPTS[3], the later one listed first (a runtime
    that stops only at the first listed id, or lets min_new_tokens hold back only that one, differs), after
    the prompt and the new tokens up to the earlier one."""
    plain = theirs(PROMPTS[3], max_new_tokens=12, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    prompt, new = plain[:-12], plain[-12:]
    late, early = new[6], new[4]
    assert late not in new[:6] and early not in new[:4], new  # each first occurs where it is taken from
    return prompt + new[:5], late, early


def test_several_eos_ids_each_end_a_row_and_min_new_tokens_holds_back_all(theirs, ours):
    """transformers reads an eos_token_id list as a set: every id ends a row (finished rows are padded with the
    first), min_new_tokens suppresses all of them; greedy and seeded sampling, one prompt and a batch."""
    head, late, early = _two_eos_ids(theirs)
    eos = dict(eos_token_id=[late, early], return_tensors=True)
    ended = _both(theirs, ours, PROMPTS[3], seeds=[0], max_new_tokens=12, do_sample=False, **eos)
    assert ended[0]["generated_token_ids"] == head  # ended at the second id listed
    held = _both(theirs, ours, PROMPTS[3], seeds=[0], max_new_tokens=12, do_sample=False, min_new_tokens=7, **eos)
    held = held[0]["generated_token_ids"]
    assert held[:len(head) - 1] == head[:-1] and held[len(head) - 1] not in (late, early)  # both held back
    rows = []
    for min_new_tokens in (0, 3):
        rows += _both(theirs, ours, PROMPTS[:4], max_new_tokens=12, min_new_tokens=min_new_tokens,
                      num_return_sequences=2, **eos)
    assert sum(record["generated_token_ids"][-1] == late for records in rows for record in records) > 10


def test_beams_end_at_every_eos_id(theirs, ours):
    """Beam search and beam sampling with an eos_token_id list: (1 + eos ids) x num_beams candidates a step, as
    transformers keeps, and every id ends a beam."""
    _, late, early = _two_eos_ids(theirs)
    ended = 0
    for do_sample in (False, True):
        records = _both(theirs, ours, PROMPTS[3], seeds=SEEDS if do_sample else [0], max_new_tokens=10, num_beams=3,
                        do_sample=do_sample, num_return_sequences=2, eos_token_id=[late, early], return_tensors=True)
        ended += sum(r["generated_token_ids"][-1] in (late, early) for r in records)
    assert ended  # some beam did end at one of the ids, so the list was in force
