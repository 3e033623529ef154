"""From a function and a call to what it computes, knowing nothing of caching: input signatures,
the trace (make_fx or the pre-dispatch recorder) and its dynamic-shape guards, output structures,
what the function reads from outside itself, and the trace-free fingerprint."""
