"""Model adapters: one file per family. Adapters know tensors, not HTTP."""
