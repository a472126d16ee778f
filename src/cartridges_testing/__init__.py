"""Tools for testing and benchmarking the project, kept out of the ``cartridges`` library.

``tiny_model`` builds a tiny Llama with its own tokenizer offline (the code paths of a real
model at toy sizes); ``stand_in_teacher`` is an OpenAI-compatible server that answers without a
model, for load and fault tests of self-study's client.
"""
