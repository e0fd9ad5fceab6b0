"""ember's engine: one folder per capability (generation, embeddings, speech, images, ranking,
jobs, gateway, media) over the shared machinery in core/, with the per-task contracts models
implement in contracts/. `engine.service.Engine` composes them. No HTTP."""
