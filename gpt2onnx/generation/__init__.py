"""Floor 4, generation: the settings and their defaults, sampling (a pure function), the token loop, beams,
speculative decoding, logprobs, the Model, transformers' pipeline and the continuous-batching Engine."""
