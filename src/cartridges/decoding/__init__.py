"""Continuous batching after shared KV prefixes: the engine the server and evaluation decode with.

``continuous`` schedules rows in and out of one running batch; ``ragged_cache`` keeps each
row's own tokens' KV; ``shared_prefix`` is the attention over one stored copy of each prefix
(a cartridge, a document) beside each row's own keys. ``cartridges.generation.generate`` is the
plain fixed-batch path they fall back to.
"""
