"""ember's engine: settings, registry, model manager and the internal request types. No HTTP."""
