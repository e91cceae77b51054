"""Training data: sample format, chat template, media decoding and the packed stream."""
