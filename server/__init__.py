"""HTTP layer: the app factory and one router per dialect. No model code here."""
