"""One module per PEFT method family."""
