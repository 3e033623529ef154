"""What runs when a decorated function is called: the decorator and its module wrapper, the hot
path, resolving a new signature (fingerprint index, load or compile), freshness checks on every
hit, the eager fallback, and ahead-of-time precompilation."""
