"""The nouns the stages share: the model, its training modules and data. Imports torch and Lightning only."""
