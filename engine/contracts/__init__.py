"""The engine's types and the typed contract each task's models implement. models/ depends only
on these and on engine/core."""
