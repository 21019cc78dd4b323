"""Test-time memories: the neural cache (Grave et al. 2017) and memory-based parameter adaptation
of the softmax (Sprechmann et al. 2018). Both keep per-stream bounded buffers and are exact,
batched implementations; see each module's docstring for the math."""

from lmmem.memories.mbpa import MbPA, MbPAConfig, adapted_log_probs, mbpa_reference
from lmmem.memories.neural_cache import CacheConfig, NeuralCache, StreamMemory, cache_reference

__all__ = ["CacheConfig", "MbPA", "MbPAConfig", "NeuralCache", "StreamMemory", "adapted_log_probs", "cache_reference", "mbpa_reference"]
