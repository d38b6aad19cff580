"""minilars."""
