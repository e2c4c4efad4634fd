"""The tokenizer: our byte-level BPE (gpt2onnx/text/bpe.py) against the `tokenizers` library on GPT-2's own files,
and the library's path for what ours does not take."""

import gc
import hashlib
import json
import os
import random
import subprocess
import sys

import pytest
import tokenizers

from gpt2onnx.errors import ModelLoadError
from gpt2onnx.runtime import heap, user_cache
from gpt2onnx.text.bpe import ASCII_PIECES, byte_chars, is_plain_gpt2
from gpt2onnx.text.tokenizer import Tokenizer
from helpers import TRAINED_DATA

HELDOUT = (TRAINED_DATA / "heldout.txt").read_text(encoding="utf-8")


def library(path, *, special=False):
    """The library's tokenizer of a tokenizer.json, reading special tokens as text unless special."""
    reader = tokenizers.Tokenizer.from_file(str(path))
    reader.encode_special_tokens = not special
    return reader


def ids(reader, text):
    return reader.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def gpt2_json(trained_dir):
    return trained_dir / "tokenizer.json"


@pytest.fixture()
def library_builds(monkeypatch):
    """How many times a Tokenizer builds the library's tokenizer (from_buffer) from here on."""
    calls = []
    original = tokenizers.Tokenizer.from_buffer

    def counted(data):
        calls.append(1)
        return original(data)

    monkeypatch.setattr(tokenizers.Tokenizer, "from_buffer", counted)
    return calls


def random_ascii(rng, count):
    """ASCII strings made to hit the pattern's corners: contractions, runs of spaces before words, digits,
    control characters (\\x1c-\\x1f are white space to Python's re, not to GPT-2's pattern), the special
    token's text."""
    common = [" ", "  ", "\n", "\n\n", "\t", "'s", "'t", "'re", "'ll", "'d", "'m", "'ve", "'S", "a", "Z", "ing",
              "0", "42", "!", "?!", ".", ",", "<|endoftext|>", "\x0b", "\x0c", "\r\n", "\x1c", "\x1f", "\x00",
              "\x7f", "_", "-", "http://x.io/a_b", "  hello", " world"]
    every = [chr(i) for i in range(128)]
    return ["".join(rng.choice(every) if rng.random() < 0.25 else rng.choice(common)
                    for _ in range(rng.randint(0, 12))) for _ in range(count)]


def test_known_gpt2_values(gpt2_json):
    """GPT-2's published ids and its byte characters (bytes_to_unicode)."""
    tokenizer = Tokenizer(gpt2_json)
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode(" Hello") == [18435]
    assert tokenizer.eos_token_id == 50256 and tokenizer.vocab_size == 50257
    chars = byte_chars()
    assert (chars[ord(" ")], chars[0], chars[ord("a")], chars[0xAD], chars[0xFF]) == ("\u0120", "\u0100", "a",
                                                                                      "\u0143", "\u00ff")
    assert len(set(chars)) == 256


def test_ascii_text_encodes_as_the_library_without_building_it(gpt2_json, library_builds):
    """The whole held-out text (120,000 tokens) and 3,000 strings made to hit the pattern's corners give the
    library's ids, and the library's tokenizer is never built for them."""
    tokenizer = Tokenizer(gpt2_json)
    theirs = library(gpt2_json)
    assert tokenizer.encode(HELDOUT) == ids(theirs, HELDOUT)
    texts = random_ascii(random.Random(0), 3000)
    mismatched = [text for text in texts if tokenizer.encode(text) != ids(theirs, text)]
    assert mismatched == []
    assert library_builds == []


def test_the_pattern_covers_ascii_text(gpt2_json):
    """The pieces of any ASCII text join back to the text (nothing dropped between matches)."""
    for text in random_ascii(random.Random(1), 500) + [HELDOUT[:5000]]:
        assert "".join(ASCII_PIECES.findall(text)) == text


def test_special_tokens_in_text(gpt2_json, library_builds):
    """"<|endoftext|>" typed in text is its characters, or the token with allow_special, as the library reads
    it each way."""
    tokenizer = Tokenizer(gpt2_json)
    plain, special = library(gpt2_json), library(gpt2_json, special=True)
    for text in ["<|endoftext|>", "a<|endoftext|>b", "<|endoftext|><|endoftext|> x\n", "<|endoftext|", "",
                 "x <|endoftext|>\n\n<|endoftext|>y z"]:
        assert tokenizer.encode(text) == ids(plain, text)
        assert tokenizer.encode(text, allow_special=True) == ids(special, text)
    assert 50256 in tokenizer.encode("a<|endoftext|>", allow_special=True)
    assert 50256 not in tokenizer.encode("a<|endoftext|>")
    assert library_builds == []


def test_other_text_is_the_library_s(gpt2_json, library_builds):
    """Text with a non-ASCII character (letters, digits and spaces of other scripts, where Unicode's classes
    decide the pieces) is encoded by the library, built once, on first use."""
    tokenizer = Tokenizer(gpt2_json)
    theirs, special = library(gpt2_json), library(gpt2_json, special=True)
    texts = ["café au lait", "naïve 'résumé'", "日本語のテキスト", "١٢٣ and ½", "a\u00a0b\u2028c\u3000 d", "emoji 🙂🙂",
             "Ωmega<|endoftext|>", "\u0085x"]
    for text in texts:
        assert tokenizer.encode(text) == ids(theirs, text)
        assert tokenizer.encode(text, allow_special=True) == ids(special, text)
    assert len(library_builds) == 2  # one for each reading of special tokens
    tokenizer.prepare_library()
    assert len(library_builds) == 2


def test_decode_equals_the_library(gpt2_json):
    """Any ids, byte tokens that split characters among them, special tokens and ids that are no token: the
    library's text (U+FFFD where bytes are no character), with and without special tokens."""
    tokenizer = Tokenizer(gpt2_json)
    theirs = library(gpt2_json)
    rng = random.Random(2)
    byte_tokens = [tokenizer.token_id(char) for char in byte_chars()]
    for _ in range(3000):
        sequence = [rng.choice(byte_tokens) if rng.random() < 0.6 else rng.randrange(50257 + 5)  # + ids of no token
                    for _ in range(rng.randint(0, 10))] + ([50256] if rng.random() < 0.2 else [])
        assert tokenizer.decode(sequence) == theirs.decode(sequence, skip_special_tokens=False)
        assert tokenizer.decode_text(sequence) == theirs.decode(sequence, skip_special_tokens=True)
    assert "\ufffd" in tokenizer.decode([tokenizer.token_id(byte_chars()[0xE2])])
    assert tokenizer.decode(tokenizer.encode(HELDOUT)) == HELDOUT


def test_token_bytes(gpt2_json):
    tokenizer = Tokenizer(gpt2_json)
    assert tokenizer.token_bytes(15496) == b"Hello" and tokenizer.token_bytes(995) == b" world"
    assert tokenizer.token_bytes(50256) == b"<|endoftext|>"
    assert tokenizer.token_bytes(tokenizer.token_id(byte_chars()[0xE2])) == b"\xe2"
    assert tokenizer.token_bytes(60000) is None
    assert tokenizer.vocabulary()["<|endoftext|>"] == 50256 and len(tokenizer.vocabulary()) == 50257


def rewritten(gpt2_json, tmp_path, change):
    spec = json.loads(gpt2_json.read_text(encoding="utf-8"))
    change(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def test_merges_written_as_strings(gpt2_json, tmp_path, library_builds):
    """tokenizers before 0.20 wrote each merge as "a b", and older versions left out keys whose value is the
    default (use_regex, byte_fallback, ignore_merges): read the same."""
    def as_strings(spec):
        spec["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]
        for key in ("byte_fallback", "ignore_merges"):
            spec["model"].pop(key, None)
        spec["pre_tokenizer"].pop("use_regex")

    path = rewritten(gpt2_json, tmp_path, as_strings)
    expected = ids(library(gpt2_json), HELDOUT[:20000])
    assert Tokenizer(path).encode(HELDOUT[:20000]) == expected == ids(library(path), HELDOUT[:20000])
    assert library_builds == []


@pytest.mark.parametrize("change", [
    lambda spec: spec["pre_tokenizer"].update(add_prefix_space=True),
    lambda spec: spec["added_tokens"].append({**spec["added_tokens"][0], "id": 50257, "content": " the",
                                              "special": False}),
    lambda spec: spec.update(normalizer={"type": "Lowercase"}),
    lambda spec: spec["model"].update(ignore_merges=True),
], ids=["prefix-space", "plain-added-token", "lowercase", "ignore-merges"])
def test_any_other_tokenizer_is_the_library_s(gpt2_json, tmp_path, change, library_builds):
    """A tokenizer.json that is not GPT-2's kind is read by the library alone, whatever the text."""
    path = rewritten(gpt2_json, tmp_path, change)
    assert not is_plain_gpt2(json.loads(path.read_text(encoding="utf-8")))
    tokenizer = Tokenizer(path)
    assert len(library_builds) == 1
    theirs = library(path)
    for text in ["Hello world", "Say the word: THE", HELDOUT[:3000]]:
        assert tokenizer.encode(text) == ids(theirs, text)
        assert tokenizer.decode(ids(theirs, text)) == theirs.decode(ids(theirs, text), skip_special_tokens=False)


def test_a_damaged_tokenizer_is_a_load_error(gpt2_json, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(gpt2_json.read_bytes()[:100_000])
    with pytest.raises(ModelLoadError, match="cannot read the tokenizer"):
        Tokenizer(path)


def test_the_collector_is_paused_and_restored():
    """collector_paused turns automatic collection off inside its block only, whatever the state before and
    even when the block fails; importing gpt2onnx leaves it on."""
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with heap.collector_paused():
            assert not gc.isenabled()
            raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with heap.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
    done = subprocess.run([sys.executable, "-c", "import gc, gpt2onnx; print(gc.isenabled())"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


@pytest.fixture()
def tables_dir(cache):
    """Where tokenizer tables are saved in the test's fresh user cache."""
    return cache / "tokenizers"


def parsed_json(monkeypatch) -> list:
    """Every parse of a tokenizer.json by a Tokenizer from here on."""
    calls = []
    original = Tokenizer._parse
    monkeypatch.setattr(Tokenizer, "_parse", lambda self: calls.append(self) or original(self))
    return calls


def same_as_library(tokenizer, path):
    """The tokenizer encodes, decodes and names tokens as the library does on the held-out text."""
    theirs = library(path)
    expected = ids(theirs, HELDOUT)
    assert tokenizer.encode(HELDOUT) == expected
    assert tokenizer.decode(expected[:5000]) == theirs.decode(expected[:5000], skip_special_tokens=False)
    assert tokenizer.vocabulary() == theirs.get_vocab(with_added_tokens=True)
    assert (tokenizer.eos_token_id, tokenizer.vocab_size) == (50256, 50257)
    assert tokenizer.encode("<|endoftext|>", allow_special=True) == [50256]


def test_the_next_read_uses_the_tables_the_first_saved(gpt2_json, tables_dir, monkeypatch, library_builds):
    """The first read parses tokenizer.json and saves its tables under the sha256 of its bytes; the next read
    builds the tokenizer from them without parsing, and both are the library's tokenizer."""
    parses = parsed_json(monkeypatch)
    first = Tokenizer(gpt2_json)
    assert len(parses) == 1
    assert [p.name for p in tables_dir.iterdir()] == [hashlib.sha256(gpt2_json.read_bytes()).hexdigest() + ".txt"]
    second = Tokenizer(gpt2_json)
    assert len(parses) == 1
    for tokenizer in (first, second):
        same_as_library(tokenizer, gpt2_json)
    assert library_builds == []


@pytest.mark.parametrize("damage", [
    lambda text: text[:len(text) // 2],  # cut short
    lambda text: "",
    lambda text: text.replace('"tokens": 50257', '"tokens": 50256', 1),  # a count that does not add up
    lambda text: text.split("\n", 1)[1],  # no header
    lambda text: '{"format": 0' + text[text.index(","):],  # another layout
], ids=["cut", "empty", "count", "no-header", "format"])
def test_damaged_tables_are_parsed_again_and_saved_again(gpt2_json, tables_dir, monkeypatch, damage):
    Tokenizer(gpt2_json)
    (saved,) = tables_dir.iterdir()
    good = saved.read_text(encoding="utf-8")
    saved.write_text(damage(good), encoding="utf-8")
    parses = parsed_json(monkeypatch)
    same_as_library(Tokenizer(gpt2_json), gpt2_json)
    assert len(parses) == 1 and saved.read_text(encoding="utf-8") == good


def test_tables_that_are_not_utf8_are_parsed_again(gpt2_json, tables_dir, monkeypatch):
    Tokenizer(gpt2_json)
    (saved,) = tables_dir.iterdir()
    saved.write_bytes(b"\xff\xfe" + saved.read_bytes())
    parses = parsed_json(monkeypatch)
    same_as_library(Tokenizer(gpt2_json), gpt2_json)
    assert len(parses) == 1


def test_nothing_is_saved_for_other_tokenizers_or_without_a_cache(gpt2_json, tmp_path, tables_dir, monkeypatch):
    """A tokenizer.json of another kind (the library's), one with a token the tables cannot hold (a NUL), or
    no user cache: nothing saved, every read parses, and the tokenizer is still the library's."""
    parses = parsed_json(monkeypatch)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    prefix_space = rewritten(gpt2_json, tmp_path / "a", lambda spec: spec["pre_tokenizer"].update(
        add_prefix_space=True))
    with_nul = rewritten(gpt2_json, tmp_path / "b", lambda spec: spec["model"]["vocab"].update({"a\x00b": 50257}))
    assert is_plain_gpt2(json.loads(with_nul.read_text(encoding="utf-8")))  # ours to encode, but not to save
    for path in (prefix_space, with_nul, prefix_space, with_nul):
        tokenizer = Tokenizer(path)
        assert tokenizer.encode(HELDOUT[:3000]) == ids(library(path), HELDOUT[:3000])
    assert len(parses) == 4 and not tables_dir.exists()
    monkeypatch.setenv(user_cache.CACHE_ENV, user_cache.OFF)
    same_as_library(Tokenizer(gpt2_json), gpt2_json)
    same_as_library(Tokenizer(gpt2_json), gpt2_json)
    assert len(parses) == 6 and not tables_dir.exists()


def test_only_the_most_recently_used_tables_are_kept(tables_dir, monkeypatch):
    monkeypatch.setattr(user_cache, "MAX_TOKENIZERS", 3)
    for n in range(5):
        user_cache.save_tokenizer_tables(f"{n:064x}", f"tables {n}")
        os.utime(tables_dir / f"{n:064x}.txt", (1000 + n, 1000 + n))  # written in this order
    assert user_cache.tokenizer_tables(f"{2:064x}") == "tables 2"  # used: now the most recent
    user_cache.save_tokenizer_tables(f"{5:064x}", "tables 5")
    assert sorted(int(p.stem, 16) for p in tables_dir.iterdir()) == [2, 4, 5]


def test_tables_are_used_from_a_cache_that_cannot_be_written(gpt2_json, tables_dir, monkeypatch):
    """A read-only cache (its files' times cannot be touched, nothing can be saved) still gives its tables."""
    Tokenizer(gpt2_json)

    def refuse(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(os, "utime", refuse)
    monkeypatch.setattr(user_cache, "_write_atomically", lambda path, text: None)  # nothing is saved
    parses = parsed_json(monkeypatch)
    same_as_library(Tokenizer(gpt2_json), gpt2_json)
    assert parses == []


def test_a_merge_listed_twice_takes_its_later_place(gpt2_json, tmp_path, tables_dir, monkeypatch):
    """GPT-2's first merge ("Ġ t") listed again at the end ranks last, as the library reads it: from the JSON
    and from the saved tables alike."""
    path = rewritten(gpt2_json, tmp_path, lambda spec: spec["model"]["merges"].append(spec["model"]["merges"][0]))
    expected = ids(library(path), HELDOUT[:20000])
    assert expected != ids(library(gpt2_json), HELDOUT[:20000])  # the change matters to this text
    parses = parsed_json(monkeypatch)
    for _ in range(2):
        assert Tokenizer(path).encode(HELDOUT[:20000]) == expected
    assert len(parses) == 1
