"""Image generation: text to image, edits and variations."""
