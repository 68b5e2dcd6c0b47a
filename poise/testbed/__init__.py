"""CPU testbed: synthetic verifiable math, a ~1M-parameter Llama, its sampler and base-checkpoint SFT."""
