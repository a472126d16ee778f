"""Self-study: synthetic conversations about corpus chunks, with the teacher's top-k log-probs."""
