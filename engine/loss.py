"""Constants of the chunked cross-entropy shared by the training loop and the estimator."""

LOSS_CHUNK = 1024   # tokens per chunk of the chunked cross-entropy
