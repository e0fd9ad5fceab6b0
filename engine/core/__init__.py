"""The machinery every capability shares: settings, the registry, the model manager and its
compute thread, the batcher, errors, access, limits, logs, metrics, codecs. No capability's
logic."""
