"""ember: a local inference engine behind OpenAI-compatible and gateway APIs."""

__version__ = "0.1.0"
