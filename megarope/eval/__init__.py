"""Long-context evaluation, one concern per module, read in this order:

    variants    how RoPE is applied at evaluation time ("as-trained", "dynamic-ntk", "log-scaled", "base=B")
    scoring     the shared core: per-position loss and correctness of token sequences under TP x CP
    metrics     what a record reports: loss, perplexity, accuracy, position buckets, the measured break
    memory      the per-rank memory estimate, and the --max-memory check
    documents   texts in, token ids out
    runs        checkpoints x variants: planning, tokenizers, one model at a time, results as they complete
    perplexity  `megarope eval`: perplexity against length, results.json/csv and plots
    passkey     `megarope passkey`: passkey retrieval accuracy by length and depth

Every module imports what it needs at its top. Nothing is imported here, so that
`import megarope.eval.variants` stays free of torch; the `megarope` command imports this package only
inside its eval and passkey handlers, so that `megarope plan` starts without torch or megatron.
"""
