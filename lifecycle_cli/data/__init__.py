"""Data for each stage: pretraining text, instructions, preferences, classification, tasks."""
