"""gpt2onnx.generation.torch_random against PyTorch itself: same seed, same exponentials, same tokens, no torch
imported."""

import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gpt2onnx.errors import InvalidArgumentError  # noqa: E402
from gpt2onnx.generation.torch_random import TorchGenerator  # noqa: E402
from helpers import blocker  # noqa: E402

SEEDS = [0, 1, 42, 2**31, 2**32 - 1] + list(range(1000, 1017))  # 22 seeds, both ends of the range included
VOCAB = 50257


def torch_probs(rng: np.random.Generator, batch: int, vocab: int = VOCAB, top_k: int = 0) -> np.ndarray:
    """Probabilities as transformers makes them: float32 softmax of scores, top-k cut to -inf (exact zeros)."""
    scores = rng.standard_normal((batch, vocab)).astype(np.float32) * 3
    if 0 < top_k < vocab:
        kth = np.sort(scores, axis=-1)[:, [-top_k]]
        scores[scores < kth] = -np.inf
    return torch.softmax(torch.from_numpy(scores), dim=-1).numpy()


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("seed", SEEDS)
def test_exponential_matches_torch(seed):
    torch.manual_seed(seed)
    ours = TorchGenerator(seed)
    for shape in [(7,), (1, VOCAB), (3, VOCAB), (2, 3, 5), 1]:  # successive calls continue the stream
        expected = torch.empty(shape).exponential_(1).numpy()
        got = ours.exponential(shape)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_multinomial_matches_torch(seed, threads):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    ours = TorchGenerator(seed)
    for batch in (1, 3, 5, 10):
        for top_k in (0, 50, 1):  # dense rows, top-k zeros, a single token left
            probs = torch_probs(rng, batch, top_k=top_k)
            expected = torch.multinomial(torch.from_numpy(probs), 1)[:, 0].numpy()
            got = ours.multinomial_one(probs)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, expected, err_msg=f"batch {batch}, top_k {top_k}")


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_stream_stays_in_step_over_50_steps(batch):
    """A generation's worth of draws, mixed shapes and sparsity, then the next raw exponentials still agree."""
    rng = np.random.default_rng(batch)
    seed = 4242 + batch
    torch.manual_seed(seed)
    ours = TorchGenerator(seed)
    for step in range(50):
        probs = torch_probs(rng, batch, vocab=[VOCAB, 1000, 7][step % 3], top_k=[0, 50, 5, 2][step % 4])
        expected = torch.multinomial(torch.from_numpy(probs), 1)[:, 0].numpy()
        np.testing.assert_array_equal(ours.multinomial_one(probs), expected, err_msg=f"step {step}")
    np.testing.assert_array_equal(ours.exponential(1000), torch.empty(1000).exponential_(1).numpy())


@pytest.fixture(scope="module")
def tiny_model():
    config = transformers.GPT2Config(vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("seed", [7, 42, 2024])
@pytest.mark.parametrize("top_k", [50, 0])
def test_replays_transformers_generate(tiny_model, seed, top_k):
    """transformers' sampling draws from torch only through multinomial: replaying its softmax gives its tokens,
    rows that finished early included (they show padding, yet their draws still advance the stream)."""
    prompt = torch.tensor([[5, 6, 7, 8]])

    def generate(**options):
        transformers.set_seed(seed)
        return tiny_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=top_k,
                                   max_new_tokens=12, num_return_sequences=3, **options)

    # make the token row 0 draws at step 2 the end of text, so that row finishes early in the real run
    eos = int(generate()[0, prompt.shape[1] + 2])
    out = generate(eos_token_id=eos, pad_token_id=eos, output_scores=True, return_dict_in_generate=True)
    new_tokens = out.sequences[:, prompt.shape[1]:].numpy()
    ours = TorchGenerator(seed)
    live = np.ones(3, bool)
    for step, scores in enumerate(out.scores):
        tokens = ours.multinomial_one(torch.softmax(scores, dim=-1).numpy())
        np.testing.assert_array_equal(tokens[live], new_tokens[live, step], err_msg=f"step {step}")
        live &= tokens != eos
    assert not live[0] and live.any() and len(out.scores) == 12  # the case the test is about did happen


# --- rare cases, forced by planting chosen 32-bit words at the head of both generators' streams ---

def _untemper(y: int) -> int:
    """The MT19937 state word whose tempered output is y."""
    y ^= y >> 18
    y ^= (y << 15) & 0xEFC60000
    x = y
    for _ in range(5):
        x = y ^ ((x << 7) & 0x9D2C5680)
    x &= 0xFFFFFFFF
    y = x
    for _ in range(3):
        x = y ^ (x >> 11)
    return x


def plant(words: list[int]) -> TorchGenerator:
    """Make torch's default generator and a TorchGenerator both output `words` (at most 623) next."""
    key = np.random.RandomState(0).get_state()[1].copy()  # any valid state will do
    key[1:1 + len(words)] = [_untemper(w) for w in words]
    ours = TorchGenerator(0)
    ours.bit_generator.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 1}}
    check = np.random.MT19937(0)
    check.state = ours.bit_generator.state
    assert check.random_raw(len(words)).tolist() == list(words)
    # torch's CPUGeneratorImpl state: seed u64, left i32, seeded i32, next u64, state[624] u64, normal cache
    state = torch.get_rng_state().numpy().copy()
    state[8:12] = np.array([624], np.int32).view(np.uint8)  # `left` 624 and `next` 1: the next word is state[1]
    state[16:24] = np.array([1], np.uint64).view(np.uint8)
    state[24:24 + 624 * 8] = key.astype(np.uint64).view(np.uint8)
    torch.set_rng_state(torch.from_numpy(state))
    return ours


def words_for(u53: list[int]) -> list[int]:
    """The two words that give each 53-bit uniform integer (spare high bits of the first word set, to be ignored)."""
    return [w for u in u53 for w in (0xFFE00000 | u >> 32, u & 0xFFFFFFFF)]


@pytest.mark.parametrize("name, special, torch_picks", [
    ("a tie goes to the first index", {}, 1),
    ("p = 0 with q = 0 is 0/0 = NaN, which wins", {2: 0}, 2),
    ("p > 0 with q = 0 is inf", {4: 0}, 4),
    ("NaN beats an earlier inf", {4: 0, 5: 0}, 5),
])
@pytest.mark.parametrize("vocab", [8, 64])  # mostly non-zero probabilities, and mostly zero ones
def test_planted_edge_cases(name, special, torch_picks, vocab):
    probs = np.zeros((1, vocab), np.float32)
    probs[0, [1, 3, 4, 6]] = 0.25
    u53 = [2**52] * vocab  # q = log 2 everywhere ...
    u53[1] = u53[3] = 1  # ... but tiny at 1 and 3, so p / q ties there
    for index, value in special.items():
        u53[index] = value
    for batch in (1, 3):  # the same row repeated: each copy draws its own words
        ours = plant(words_for(u53 * batch))
        expected = torch.multinomial(torch.from_numpy(np.repeat(probs, batch, axis=0)), 1)[:, 0].numpy()
        got = ours.multinomial_one(np.repeat(probs, batch, axis=0))
        assert expected.tolist() == [torch_picks] * batch, name  # torch's rule, which we replicate
        np.testing.assert_array_equal(got, expected, err_msg=name)


@pytest.mark.parametrize("case", ["max ratio below 1/8", "max ratio below 1/1024", "subnormal probabilities"])
def test_draws_where_few_candidates_are_not_enough(case):
    """The sampler computes q only for entries whose ratio could beat 1/k (k = 8 first); when none does, it
    widens the search. Planted words make every q large, so the first (and second) bound fail."""
    rng = np.random.default_rng(len(case))
    vocab = 300
    if case == "max ratio below 1/8":  # q about log 2, p about 1/300: ratios about 1/200
        u53 = (2**52 + rng.integers(-2**48, 2**48, vocab)).tolist()
        probs = rng.dirichlet(np.full(vocab, 5.0)).astype(np.float32)
    elif case == "max ratio below 1/1024":  # q from 20 to 36: ratios below 1/5000
        u53 = (2**53 - rng.integers(1, 2**24, vocab)).tolist()
        probs = rng.dirichlet(np.full(vocab, 5.0)).astype(np.float32)
    else:  # every ratio is subnormal or 0: the first maximum of all exact ratios
        u53 = rng.integers(2**50, 2**53, vocab).tolist()
        probs = np.full(vocab, 1e-45, np.float32)
        probs[::7] = 3e-45
    probs = probs[None]
    ours = plant(words_for(u53))
    expected = torch.multinomial(torch.from_numpy(probs), 1)[:, 0].numpy()
    np.testing.assert_array_equal(ours.multinomial_one(probs), expected, err_msg=case)


def test_values_on_a_float32_rounding_edge():
    """Where numpy's vectorised log1p and the C library's (torch's) round to different float32 values."""
    target = np.random.default_rng(0).uniform(1e-3, 30, 20_000).astype(np.float32).astype(np.float64)
    midpoint = target + np.spacing(target.astype(np.float32)).astype(np.float64) / 2
    u53 = (np.round(-np.expm1(-midpoint) * 2.0**53).astype(np.int64)[:, None] + np.arange(-3, 4)).ravel()
    numpy_q = (-np.log1p(-u53 * 2.0**-53)).astype(np.float32)
    differ = [int(u) for u, q in zip(u53, numpy_q) if np.float32(-math.log1p(-u * 2.0**-53)) != q]
    u53 = (differ + u53.tolist())[:300]  # the disagreements first, then values merely close to an edge
    ours = plant(words_for(u53))
    np.testing.assert_array_equal(ours.exponential(len(u53)), torch.empty(len(u53)).exponential_(1).numpy())


# --- arguments ---

@pytest.mark.parametrize("seed", [-1, 2**32, 2**64, 1.5, True, "3", None])
def test_seed_range_is_set_seeds(seed):
    with pytest.raises(InvalidArgumentError, match="seed must be an integer from 0 to 2\\*\\*32-1"):
        TorchGenerator(seed)
    if isinstance(seed, int) and not isinstance(seed, bool):
        with pytest.raises(ValueError):
            transformers.set_seed(seed)  # the range we accept is the one set_seed accepts


def test_numpy_integer_seed():
    torch.manual_seed(9)
    np.testing.assert_array_equal(TorchGenerator(np.uint32(9)).exponential(5), torch.empty(5).exponential_(1).numpy())


@pytest.mark.parametrize("probs", [
    np.array([[0.5, np.nan]], np.float32), np.array([[0.5, -0.1]], np.float32), np.array([[0.5, np.inf]], np.float32),
    np.array([[0.5, 0.5], [0, 0]], np.float32),
])
def test_invalid_probabilities_are_refused_like_torch(probs):
    with pytest.raises(RuntimeError):
        torch.multinomial(torch.from_numpy(probs), 1)
    with pytest.raises(InvalidArgumentError):
        TorchGenerator(0).multinomial_one(probs)


@pytest.mark.parametrize("probs", [np.array([[0.5, 0.5]]), np.array([0.5, 0.5], np.float32)])
def test_only_float32_batches(probs):
    with pytest.raises(InvalidArgumentError, match="float32 \\[batch, vocab\\]"):
        TorchGenerator(0).multinomial_one(probs)


def test_module_does_not_import_torch():
    code = blocker("torch", "transformers") + """
import numpy as np
from gpt2onnx.generation.torch_random import TorchGenerator
rng = TorchGenerator(42)
rng.exponential((2, 3))
rng.multinomial_one(np.full((2, 10), 0.1, np.float32))
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))
assert loaded == [], loaded
print("TORCH-FREE-OK")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "TORCH-FREE-OK" in done.stdout
