"""Speech: transcription, translation and text to speech."""
